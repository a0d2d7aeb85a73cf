"""The human-heavy MS COCO subset: the selection rule, person masks, face boxes, and the dataset rows.

Everything here is a pure function of pycocotools ``COCO`` objects (or plain annotation dicts) and
explicit thresholds; nothing reads params or knows DVC.

**The rule** (:func:`select_images`), applied to every image of a split in this order; an image is
counted under the first rule that removes it:

1. ``malformed_annotation``: a person annotation whose segmentation cannot be decoded (a polygon with
   fewer than 3 points, an RLE whose size is not the image's, a missing field). Its mask would be
   incomplete, so the image goes; the annotation ids are listed in the selection.
2. ``small_image``: ``min(width, height) < min_side``.
3. ``no_person``: no person annotation at all.
4. ``crowd``: a person annotation with ``iscrowd=1`` (unless ``allow_crowd``).
5. ``too_many_persons``: more than ``max_persons`` non-crowd persons.
6. ``no_visible_face``: no person with at least ``min_face_keypoints`` of the five face keypoints (nose,
   eyes, ears: COCO indices 0-4) at visibility ``>= face_visibility`` (2: visible, 1: labelled but occluded).
7. ``small_largest_person``: the largest person's area (COCO's ``area``, the mask's pixel count) is less
   than ``min_largest_person_fraction`` of the image.
8. ``low_person_fraction``: the union of all person masks (crowd regions included when allowed) covers
   less than ``min_person_area_fraction`` of the image. Computed on RLEs with pycocotools (merge + area),
   never on dense arrays, so it is the last and only costly rule.

**Face boxes** (:func:`face_boxes`): for each non-crowd person with at least ``min_face_keypoints`` face
keypoints at visibility ``>= face_visibility``: take the min/max box of those keypoints, then a square
centred on that box's centre with side ``max(face_box_scale * max(box_w, box_h), min_face_size)`` px,
clipped to the image, as ``[x1, y1, x2, y2]`` (:data:`~pipelines.faces.boxes.BOX_CONVENTION`, every dataset's). Ear to ear spans about a face's width and eye to ear about
half a profile face, so a scale of 1.8 covers forehead to chin on frontal and three-quarter faces.
"""
from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import numpy as np
from pycocotools import mask as mask_utils

from pipelines import images
from pipelines.faces.boxes import BOX_CONVENTION
from pipelines.hfdata import DatasetSchema, ParquetShardWriter, write_card

PERSON = 1  # COCO category id of "person"
FACE_KEYPOINTS = 5  # nose, left eye, right eye, left ear, right ear: the first 5 of COCO's 17
RULES = ("malformed_annotation", "small_image", "no_person", "crowd", "too_many_persons", "no_visible_face",
         "small_largest_person", "low_person_fraction")


@dataclass(frozen=True)
class SelectionRule:
    """Every threshold of the selection rule (see the module docstring for the order)."""

    min_side: int = 256
    max_persons: int = 10
    allow_crowd: bool = False
    min_face_keypoints: int = 2
    face_visibility: int = 2
    min_largest_person_fraction: float = 0.05
    min_person_area_fraction: float = 0.15

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FaceBoxRule:
    """How a face box is grown from the face keypoints (see the module docstring)."""

    min_face_keypoints: int = 2
    face_visibility: int = 2
    face_box_scale: float = 1.8
    min_face_size: float = 8.0

    def to_dict(self) -> dict:
        return asdict(self)


class MalformedAnnotation(ValueError):
    """A person annotation whose segmentation or keypoints cannot be read."""


#: The columns of the COCO humans dataset
SCHEMA = DatasetSchema(
    features=datasets.Features({
        "image_id": datasets.Value("int64"),
        "image": datasets.Image(),
        "person_mask": datasets.Image(),
        "face_boxes": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
        "text": datasets.List(datasets.Value("string")),
        "person_area_fraction": datasets.Value("float32"),
        "num_persons": datasets.Value("int32"),
    }),
    descriptions={
        "image_id": "the COCO 2017 image id.",
        "image": "the COCO image (RGB JPEG as fetched; any other file converted to an 8-bit RGB PNG).",
        "person_mask": "grayscale PNG of the image's size, 255 on the union of all person segmentations (crowd "
                       "regions included when allowed), decoded with pycocotools (polygons and RLE), 0 elsewhere.",
        "face_boxes": f"one face box per person with enough visible face keypoints (rule below), {BOX_CONVENTION}.",
        "text": "all of the image's COCO captions (a list; diffusers' training scripts pick one at random).",
        "person_area_fraction": "the person-mask union's area over the image's area.",
        "num_persons": "non-crowd person annotations.",
    },
)


def annotation_rle(ann: dict, height: int, width: int) -> dict:
    """The RLE of one annotation's segmentation (polygons, uncompressed or compressed RLE).

    Raises :class:`MalformedAnnotation` when it cannot be decoded.
    """
    segm = ann.get("segmentation")
    try:
        if isinstance(segm, list):
            polys = [p for p in segm if isinstance(p, list)]
            if not polys or len(polys) != len(segm):
                raise MalformedAnnotation("polygon segmentation is empty or not a list of lists")
            for p in polys:
                if len(p) < 6 or len(p) % 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in p):
                    raise MalformedAnnotation(f"polygon with {len(p)} coordinates (need an even count >= 6)")
            return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        if isinstance(segm, dict) and "counts" in segm and "size" in segm:
            if list(segm["size"]) != [height, width]:
                raise MalformedAnnotation(f"RLE size {segm['size']} is not the image's [{height}, {width}]")
            counts = segm["counts"]
            if isinstance(counts, list):
                if sum(counts) != height * width or any(c < 0 for c in counts):
                    raise MalformedAnnotation("uncompressed RLE counts do not sum to height*width")
                return mask_utils.frPyObjects(segm, height, width)
            if isinstance(counts, (str, bytes)):
                return {"size": [height, width], "counts": counts}
        raise MalformedAnnotation(f"segmentation of type {type(segm).__name__} is neither polygons nor RLE")
    except MalformedAnnotation:
        raise
    except Exception as exc:  # pycocotools raises bare exceptions on garbage
        raise MalformedAnnotation(f"pycocotools could not read the segmentation: {exc}") from exc


def face_keypoints(ann: dict, visibility: int) -> np.ndarray:
    """The face keypoints (x, y) of one annotation whose visibility flag is ``>= visibility`` (k x 2)."""
    kp = ann.get("keypoints")
    if not kp:
        return np.zeros((0, 2), np.float32)
    if len(kp) != 51:
        raise MalformedAnnotation(f"{len(kp)} keypoint values (COCO has 17 x 3 = 51)")
    arr = np.asarray(kp[: 3 * FACE_KEYPOINTS], dtype=np.float32).reshape(FACE_KEYPOINTS, 3)
    return arr[arr[:, 2] >= visibility, :2]


def face_box(points: np.ndarray, width: int, height: int, rule: FaceBoxRule) -> list[float] | None:
    """The ``[x1, y1, x2, y2]`` face box from face keypoints (see the module docstring); None if too few."""
    if len(points) < max(1, rule.min_face_keypoints):
        return None
    lo, hi = points.min(0), points.max(0)
    cx, cy = (lo + hi) / 2
    side = max(rule.face_box_scale * float(max(hi - lo)), rule.min_face_size)
    x1, y1 = max(0.0, cx - side / 2), max(0.0, cy - side / 2)
    x2, y2 = min(float(width), cx + side / 2), min(float(height), cy + side / 2)
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return [float(x1), float(y1), float(x2), float(y2)]


def face_boxes(anns: list[dict], width: int, height: int, rule: FaceBoxRule) -> list[list[float]]:
    """Face boxes of every non-crowd person with enough visible face keypoints, in annotation order."""
    boxes = []
    for ann in anns:
        if ann.get("iscrowd"):
            continue
        box = face_box(face_keypoints(ann, rule.face_visibility), width, height, rule)
        if box is not None:
            boxes.append(box)
    return boxes


def person_union_rle(anns: list[dict], height: int, width: int, include_crowd: bool = True) -> dict | None:
    """The union of the person segmentations as one RLE (None when there is none)."""
    rles = [annotation_rle(a, height, width) for a in anns if include_crowd or not a.get("iscrowd")]
    if not rles:
        return None
    return mask_utils.merge(rles) if len(rles) > 1 else rles[0]


def person_mask(anns: list[dict], height: int, width: int, include_crowd: bool = True) -> np.ndarray:
    """The binary union of the person masks, ``uint8`` (height x width), 1 on persons."""
    rle = person_union_rle(anns, height, width, include_crowd)
    if rle is None:
        return np.zeros((height, width), np.uint8)
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def person_annotations(coco: Any, image_id: int) -> list[dict]:
    """Person annotations of one image, crowds included, in annotation-id order."""
    anns = [a for a in coco.imgToAnns.get(image_id, []) if a.get("category_id") == PERSON]
    return sorted(anns, key=lambda a: a.get("id", 0))


def _check(img: dict, anns: list[dict], rule: SelectionRule) -> tuple[str | None, dict]:
    """The first rule that removes ``img`` (None: kept) and the image's statistics."""
    width, height = int(img.get("width") or 0), int(img.get("height") or 0)
    stats: dict[str, Any] = {}
    bad = []
    for a in anns:  # cheap structural checks; full decoding happens only for the union below
        segm, kp = a.get("segmentation"), a.get("keypoints")
        if (not isinstance(segm, (list, dict)) or (isinstance(segm, list) and any(
                not isinstance(p, list) or len(p) < 6 or len(p) % 2 for p in segm)) or not segm
                or (kp and len(kp) != 51) or not isinstance(a.get("area", 0), (int, float))):
            bad.append(a.get("id"))
    if bad or width <= 0 or height <= 0:
        stats["malformed_ids"] = bad
        return "malformed_annotation", stats
    if min(width, height) < rule.min_side:
        return "small_image", stats
    if not anns:
        return "no_person", stats
    crowd = [a for a in anns if a.get("iscrowd")]
    persons = [a for a in anns if not a.get("iscrowd")]
    if crowd and not rule.allow_crowd:
        return "crowd", stats
    stats["num_persons"] = len(persons)
    if len(persons) > rule.max_persons:
        return "too_many_persons", stats
    faces = sum(len(face_keypoints(a, rule.face_visibility)) >= rule.min_face_keypoints for a in persons)
    stats["num_faces"] = faces
    if faces == 0:
        return "no_visible_face", stats
    image_area = float(width * height)
    largest = max((float(a.get("area", 0)) for a in persons), default=0.0) / image_area
    stats["largest_person_fraction"] = largest
    if largest < rule.min_largest_person_fraction:
        return "small_largest_person", stats
    try:
        union = person_union_rle(anns, height, width, include_crowd=True)
    except MalformedAnnotation:
        stats["malformed_ids"] = [a.get("id") for a in anns]
        return "malformed_annotation", stats
    fraction = float(mask_utils.area(union)) / image_area if union is not None else 0.0
    stats["person_area_fraction"] = fraction
    if fraction < rule.min_person_area_fraction:
        return "low_person_fraction", stats
    return None, stats


def select_images(coco: Any, rule: SelectionRule) -> dict:
    """Apply the rule to every image of ``coco`` (a pycocotools ``COCO`` holding person annotations).

    Returns ``{"image_ids": [...kept, ascending], "removed": {rule: count, in rule order}, "num_images",
    "kept", "stats": {image_id: {...}} (kept images only), "malformed_annotation_ids": [...]}``.
    """
    removed: OrderedDict[str, int] = OrderedDict((r, 0) for r in RULES)
    kept, stats, malformed = [], {}, []
    for image_id in sorted(coco.imgs):
        img = coco.imgs[image_id]
        anns = person_annotations(coco, image_id)
        reason, info = _check(img, anns, rule)
        if reason is None:
            kept.append(int(image_id))
            stats[int(image_id)] = info
        else:
            removed[reason] += 1
            malformed.extend(info.get("malformed_ids", []))
    return {"image_ids": kept, "removed": dict(removed), "num_images": len(coco.imgs), "kept": len(kept),
            "stats": stats, "malformed_annotation_ids": sorted(m for m in malformed if m is not None)}


def captions_by_image(captions: Any) -> dict[int, list[str]]:
    """``image_id -> [caption, ...]`` (annotation-id order, stripped) from a captions ``COCO`` or its dict."""
    anns = captions.dataset.get("annotations", []) if hasattr(captions, "dataset") else captions.get("annotations", [])
    out: dict[int, list[tuple[int, str]]] = {}
    for a in anns:
        text = a.get("caption")
        if isinstance(text, str) and text.strip():
            out.setdefault(int(a["image_id"]), []).append((int(a.get("id", 0)), text.strip()))
    return {k: [t for _, t in sorted(v)] for k, v in out.items()}


def image_row(img: dict, anns: list[dict], captions: list[str], image: Any, face_rule: FaceBoxRule,
              include_crowd: bool) -> dict:
    """One dataset row (the columns of :data:`SCHEMA`): ``image`` (anything :class:`datasets.Image` encodes), mask,
    faces, text, stats."""
    height, width = int(img["height"]), int(img["width"])
    mask = person_mask(anns, height, width, include_crowd)
    return {
        "image_id": int(img["id"]),
        "image": image,
        "person_mask": mask * np.uint8(255),
        "face_boxes": face_boxes(anns, width, height, face_rule),
        "text": list(captions),
        "person_area_fraction": float(mask.sum()) / float(height * width),
        "num_persons": sum(1 for a in anns if not a.get("iscrowd")),
    }


# ---------------------------------------------------------------- assembly

SPLIT_NAMES = {"train": "train", "val": "validation"}  # COCO split -> dataset split
#: What reports/datasets/coco_humans.json holds (:func:`pipelines.reports.split_report`); the removals per rule,
#: the rules, reference counts, image fetch, data source and params go to its .provenance.json
REPORT_METRICS = ("rows", "face_boxes", "skipped",
                  *(f"selection.{s}.{k}" for s in SPLIT_NAMES for k in ("num_images", "kept")),
                  "uses_embedded_sample", "uses_standin_models")


def _card_body(report: dict) -> str:
    rule, rows = report["rule"], report["rows"]
    lines = ["# COCO humans (mask-aware losses)", "",
             "MS COCO 2017 images covered substantially by people, with the binary union of the person masks, "
             "face boxes from the face keypoints, and all of the image's captions. Built by the facecontrol "
             "pipeline (`select_coco` then `assemble_coco`).", ""]
    if report.get("uses_embedded_sample"):
        lines += ["**Embedded sample**: these rows are a COCO-format sample drawn by code, not COCO images; the "
                  "counts below are not the real subset's. `dvc repro` with `base.profile=real` reports those.", ""]
    lines += ["## Selection rule (in order; an image is counted under the first rule that removes it)", "",
              "1. `malformed_annotation`: a person annotation that cannot be decoded removes its image.",
              f"2. `small_image`: min(width, height) < {rule['min_side']} px.",
              "3. `no_person`: no person annotation.",
              f"4. `crowd`: an `iscrowd=1` person annotation (allow_crowd: {rule['allow_crowd']}).",
              f"5. `too_many_persons`: more than {rule['max_persons']} persons.",
              f"6. `no_visible_face`: no person with >= {rule['min_face_keypoints']} of nose/eyes/ears at "
              f"visibility >= {rule['face_visibility']}.",
              f"7. `small_largest_person`: largest person < {rule['min_largest_person_fraction']} of the image.",
              f"8. `low_person_fraction`: union of person masks < {rule['min_person_area_fraction']} of the image.",
              "", "| split | images | kept by the rule | rows | " + " | ".join(RULES) + " |",
              "|---|---|---|---|" + "---|" * len(RULES)]
    for coco_split, name in SPLIT_NAMES.items():
        sel = report["selection"][coco_split]
        lines.append(f"| {name} | {sel['num_images']} | {sel['kept']} | {rows.get(name, 0)} | "
                     + " | ".join(str(sel["removed"][r]) for r in RULES) + " |")
    fb = report["face_box_rule"]
    lines += ["", f"Rows skipped at assembly (image missing or unreadable): {report['skipped']}.", "",
              "For comparison, the Masked_LDM subset (rule never published) had 37,470 train / 1,565 validation images.",
              "", "## Columns", "", *SCHEMA.columns_markdown(), "",
              f"Face box rule: for each non-crowd person with >= {fb['min_face_keypoints']} face keypoints (nose, "
              f"eyes, ears) at visibility >= {fb['face_visibility']}, a square centred on those keypoints' min/max "
              f"box, side max({fb['face_box_scale']} x the box's longer side, {fb['min_face_size']} px), clipped to "
              "the image.", "",
              "Splits: COCO's official ones, kept: `train` = the selected train2017 images, `validation` = the "
              "selected val2017 images (no hash rule: the official split keeps results comparable with COCO's).",
              "", images.describe_conversions(report.get("image_conversions")),
              "", "## License", "", "COCO annotations CC BY 4.0; images under their Flickr licenses "
              "(see the `license` field of COCO's image entries).", ""]
    return "\n".join(lines)


def assemble_coco_humans(selection: dict, coco_root: Any, images_dir: Any, out_dir: Any, face_rule: FaceBoxRule,
                         rows_per_file: int, load: Any, source: dict | None = None) -> dict:
    """Write the dataset (train / validation) under ``out_dir`` from a selection; return the report.

    ``load(path) -> COCO`` reads an annotation file; ``coco_root`` holds ``annotations/``, ``images_dir``
    holds ``{split}2017/``. A missing, unreadable or wrongly sized image, or one with no meaningful RGB
    conversion (:mod:`pipelines.images`), is skipped and counted.
    """
    import shutil
    from pathlib import Path

    coco_root, images_dir, out_dir = Path(coco_root), Path(images_dir), Path(out_dir)
    rule = selection["rule"]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    features = SCHEMA.features
    counts, nbytes, skipped, faces = {}, {}, {}, {}
    conversions: Counter = Counter()
    for coco_split, name in SPLIT_NAMES.items():
        ids = selection["splits"][coco_split]["image_ids"]
        persons = load(coco_root / "annotations" / f"person_keypoints_{coco_split}2017.json")
        caps = captions_by_image(load(coco_root / "annotations" / f"captions_{coco_split}2017.json"))
        skip = {images.MISSING_IMAGE: 0, images.CORRUPT_IMAGE: 0, images.WRONG_IMAGE_SIZE: 0,
                images.UNSUPPORTED_IMAGE_MODE: 0, "malformed_annotation": 0}
        n_faces = 0
        with ParquetShardWriter(out_dir, name, features, rows_per_file) as writer:
            for image_id in ids:
                img = persons.imgs.get(image_id)
                if img is None:
                    skip["missing_image"] += 1
                    continue
                try:  # the file's own bytes when an RGB JPEG, else converted to 8-bit RGB PNG
                    data, note = images.encode(images_dir / f"{coco_split}2017" / img["file_name"],
                                            (int(img["width"]), int(img["height"])), images.RGB, ("JPEG",))
                except images.ImageError as exc:
                    skip[exc.reason] += 1
                    continue
                if note:
                    conversions[note] += 1
                image = {"bytes": data, "path": None}
                try:
                    row = image_row(img, person_annotations(persons, image_id), caps.get(image_id, []), image,
                                    face_rule, include_crowd=bool(rule["allow_crowd"]))
                except MalformedAnnotation:
                    skip["malformed_annotation"] += 1
                    continue
                n_faces += len(row["face_boxes"])
                writer.write(row)
        counts[name], nbytes[name], skipped[name], faces[name] = writer.rows_written, writer.num_bytes, skip, n_faces
    if sum(counts.values()) == 0:
        raise RuntimeError(f"no rows to assemble: skipped {skipped}; check fetch_coco_images")
    report: dict[str, Any] = {
        "rows": {**counts, "total": sum(counts.values())},
        "selection": {s: {k: selection["splits"][s][k] for k in ("num_images", "kept", "removed",
                                                                  "removed_in_order", "malformed_annotation_ids")
                         if k in selection["splits"][s]}
                      for s in SPLIT_NAMES},
        "rule_order": list(RULES),
        "rule": rule,
        "face_box_rule": face_rule.to_dict(),
        "skipped": skipped,
        "image_conversions": dict(sorted(conversions.items())),
        "face_boxes": faces,
        "reference_counts": {"train": 37470, "validation": 1565, "source": "Masked_LDM (CMU, 2023), rule unpublished"},
        "data_source": source or None,
        "uses_embedded_sample": (source or {}).get("source") == "embedded",
        "dataset_dir": out_dir.as_posix(),
    }
    splits = {s: counts[s] for s in counts if counts[s]}
    write_card(out_dir, pretty_name="COCO humans (person masks, face boxes, captions)", features=features,
               splits=splits, split_bytes={s: nbytes[s] for s in splits}, license="cc-by-4.0",
               source_datasets=["detection-datasets/coco"], task_categories=["text-to-image"],
               tags=["coco", "humans", "segmentation-masks", "faces"], body_markdown=_card_body(report))
    return report


def measure_selection(path: str, rule: dict) -> dict:
    """Load ``path`` with pycocotools and apply the rule: wall times and this process's peak RSS.

    Run it in a fresh process (the peak RSS is the process's own, since its start).
    """
    import resource
    import time

    from pipelines.sources.coco import load_coco

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    coco = load_coco(path)
    t1 = time.perf_counter()
    result = select_images(coco, SelectionRule(**rule))
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"load_seconds": t1 - t0, "select_seconds": t2 - t1, "total_seconds": t2 - t0,
            "peak_rss_mib": peak / 1024, "rss_before_mib": base / 1024, "kept": result["kept"],
            "removed": result["removed"]}
