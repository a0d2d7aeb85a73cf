"""MS COCO 2017: reading annotation files, an embedded sample in the real schema, and fetching.

Layout (the official one): ``annotations/{instances,person_keypoints,captions}_{split}2017.json`` and
``{split}2017/{file_name}`` for split ``train`` and ``val``.

* :func:`write_coco_sample` writes a small COCO-format sample by code: polygons, uncompressed and
  compressed RLE persons, an ``iscrowd=1`` crowd, keypoints with visibility flags, captions, and JPEGs
  drawn from the masks; each image exercises one branch of the selection rule (``SAMPLE_EXPECTED``), one
  kept image has no file (a missing image) and one person annotation is malformed.
* :func:`fetch_annotations` gets the official annotation zip (resumable, verified against its published md5,
  swapped in only once complete) or copies a local folder.
* :func:`fetch_images` gets only the given images: copied from a local COCO folder or downloaded by their
  ``coco_url``; files already present that decode are kept (a rerun resumes), failures are listed.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from pipelines.reports import write_json
from pipelines.sources.downloads import DownloadError, download, install_archive

SPLITS = ("train", "val")
KINDS = ("instances", "person_keypoints", "captions")
ANNOTATIONS_URL = "https://images.cocodataset.org/annotations/annotations_trainval2017.zip"
# md5 of that zip as published in public download scripts (intel/neural-compressor
# examples/pytorch/fx/object_detection/maskrcnn/download_dataset.sh, PaddleDetection's reader tests); COCO
# publishes no sha256
ANNOTATIONS_MD5 = "f4bbac642086de4f52a3fdda2de5fa2c"
HTTPS_HOSTS = ("http://images.cocodataset.org/",)  # hosts whose http URLs (coco_url) are fetched over https
KEYPOINT_NAMES = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                  "right_knee", "left_ankle", "right_ankle"]
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9], [8, 10],
            [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
PERSON_CATEGORY = {"supercategory": "person", "id": 1, "name": "person", "keypoints": KEYPOINT_NAMES,
                   "skeleton": SKELETON}
DOG_CATEGORY = {"supercategory": "animal", "id": 18, "name": "dog"}
LICENSE = ("COCO annotations: CC BY 4.0 (cocodataset.org/#termsofuse); images: the Flickr terms of each image's "
           "license (the `license` field of each image entry)")


def annotation_path(root: str | Path, kind: str, split: str) -> Path:
    """``root/annotations/{kind}_{split}2017.json``."""
    return Path(root) / "annotations" / f"{kind}_{split}2017.json"


def image_path(root: str | Path, split: str, file_name: str) -> Path:
    """``root/{split}2017/{file_name}``."""
    return Path(root) / f"{split}2017" / file_name


def load_coco(path: str | Path) -> Any:
    """A pycocotools ``COCO`` for ``path`` without its progress prints."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the fetch_coco_annotations stage first")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


# ---------------------------------------------------------------- the embedded sample

W, H = 320, 256  # sample image size: min side 256 passes the default min_side


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _face_kps(cx: float, cy: float, half: float, v: int = 2) -> list[float]:
    """17 COCO keypoints: a face (nose, eyes, ears) around (cx, cy) with visibility v, shoulders and hips below."""
    pts = [(cx, cy, v), (cx - half / 2, cy - half / 4, v), (cx + half / 2, cy - half / 4, v),
           (cx - half, cy, v), (cx + half, cy, v),
           (cx - 1.5 * half, cy + 3 * half, 2), (cx + 1.5 * half, cy + 3 * half, 2)]
    pts += [(0, 0, 0)] * 4 + [(cx - half, cy + 8 * half, 2), (cx + half, cy + 8 * half, 2)] + [(0, 0, 0)] * 4
    return [float(c) if i % 3 < 2 else int(c) for p in pts for i, c in enumerate(p)]


def _rle_rect(x0: int, y0: int, x1: int, y1: int, h: int, w: int, compressed: bool) -> dict:
    m = np.zeros((h, w), np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    if compressed:
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    flat = m.flatten(order="F")  # uncompressed RLE: run lengths, starting with a run of zeros
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": [h, w], "counts": counts}


# (split, image_id, width, height, persons, extra, expected, has_file); persons: (kind, geometry, face)
#   kind poly: geometry = list of rects; rle / crle: one rect as uncompressed / compressed RLE; crowd: crowd RLE
#   face: (cx, cy, half, visibility) or None
_SAMPLE: list[tuple] = [
    ("train", 1, W, H, [("poly", [(100, 40, 220, 250)], (160, 70, 20, 2))], None, "kept", True),
    ("train", 2, W, H, [("poly", [(40, 60, 140, 250)], (90, 90, 16, 2)), ("rle", (120, 80, 240, 250), None)],
     None, "kept", True),
    ("train", 3, 200, 150, [("poly", [(20, 10, 180, 150)], (100, 40, 20, 2))], None, "small_image", True),
    ("train", 4, W, H, [], "dog", "no_person", True),
    ("train", 5, W, H, [("poly", [(100, 40, 220, 250)], (160, 70, 20, 2)), ("crowd", (0, 150, 320, 256), None)],
     None, "crowd", True),
    ("train", 6, W, H, [("poly", [(5 + 28 * k, 100, 25 + 28 * k, 140)], (15 + 28 * k, 105, 4, 2)) for k in range(11)],
     None, "too_many_persons", True),
    ("train", 7, W, H, [("poly", [(100, 40, 220, 250)], (160, 70, 20, 0))], None, "no_visible_face", True),
    ("train", 8, W, H, [("poly", [(150, 150, 170, 180)], (160, 155, 4, 2))], None, "small_largest_person", True),
    ("train", 9, W, H, [("poly", [(100, 100, 190, 200)], (145, 115, 10, 2))], None, "low_person_fraction", True),
    ("train", 10, W, H, [("bad", [(100, 40, 220, 250)], (160, 70, 20, 2))], None, "malformed_annotation", True),
    ("train", 11, W, H, [("crle", (60, 30, 200, 256), (130, 60, 18, 2))], None, "kept", False),
    ("train", 12, W, H, [("poly", [(120, 20, 200, 120), (100, 120, 220, 256)], (160, 50, 18, 2))], None, "kept", True),
    ("val", 101, W, H, [("poly", [(80, 30, 240, 256)], (160, 70, 24, 2))], None, "kept", True),
    ("val", 102, W, H, [("crle", (20, 50, 150, 256), (85, 80, 18, 2)), ("poly", [(170, 40, 300, 256)], None)],
     None, "kept", True),
    ("val", 103, W, H, [("poly", [(100, 40, 220, 250)], None)], None, "no_visible_face", True),
    ("val", 104, W, H, [("poly", [(100, 40, 220, 250)], (160, 70, 20, 2)), ("crowd", (0, 200, 320, 256), None)],
     None, "crowd", True),
]
# What the default rule (pipelines.coco_humans.SelectionRule()) does with each image
SAMPLE_EXPECTED = {split: {r[1]: r[6] for r in _SAMPLE if r[0] == split} for split in SPLITS}
SAMPLE_MISSING_IMAGES = {r[1] for r in _SAMPLE if not r[7]}  # kept by the rule, but no image file
SAMPLE_MALFORMED_ANNOTATION_IDS = [1001]  # image 10's person: a "polygon" of 2 points
_CAPTIONS = ["A person standing in front of a plain wall.", "Someone posing for a photograph.",
             "A person in a brightly coloured shirt.", "People gathered outside on a sunny day.",
             "A close up of a person looking at the camera."]


def _person(ann_id: int, image_id: int, kind: str, geom: Any, face: tuple | None, w: int, h: int) -> dict:
    crowd = kind == "crowd"
    if kind in ("poly", "bad"):
        segm = [_rect(*r) for r in geom]
        if kind == "bad":
            segm = [segm[0][:4]]  # a polygon of 2 points: malformed
            rle = mask_utils.merge(mask_utils.frPyObjects([_rect(*geom[0])], h, w))
        else:
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        xs = [r[0] for r in geom] + [r[2] for r in geom]
        ys = [r[1] for r in geom] + [r[3] for r in geom]
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    else:
        segm = _rle_rect(*geom, h, w, compressed=kind != "rle")
        rle = mask_utils.frPyObjects(segm, h, w) if kind == "rle" else segm
        bbox = [geom[0], geom[1], geom[2] - geom[0], geom[3] - geom[1]]
    kps = _face_kps(*face) if face else ([0] * 51 if crowd else _face_kps(bbox[0] + bbox[2] / 2, bbox[1] + 20, 10, 0))
    return {"segmentation": segm, "num_keypoints": int(sum(1 for v in kps[2::3] if v > 0)),
            "area": float(mask_utils.area(rle)), "iscrowd": int(crowd), "keypoints": kps, "image_id": image_id,
            "bbox": [float(b) for b in bbox], "category_id": 1, "id": ann_id}


def _draw(w: int, h: int, anns: list[dict], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 200 // max(w, 1)), (yy * 200 // max(h, 1)), np.full_like(xx, 90)], -1).astype(np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    for a in anns:
        if a["category_id"] != 1 or a["iscrowd"]:
            continue
        color = tuple(int(c) for c in rng.integers(40, 230, 3))
        x, y, bw, bh = a["bbox"]
        draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=color)
        kp = np.asarray(a["keypoints"][:15], np.float32).reshape(5, 3)
        if (kp[:, 2] > 0).any():
            cx, cy = kp[0, :2]
            r = max(3.0, float(np.abs(kp[3, 0] - kp[4, 0])) / 2)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(235, 200, 170))
    return img


def write_coco_sample(root: str | Path, seed: int = 0, images: bool = True) -> dict:
    """Write the embedded sample under ``root`` in the official layout; return a summary.

    Annotations are fixed (the known answers of the tests); ``seed`` only varies the drawn colours.
    With ``images=False`` only the annotation files are written.
    """
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"source": "embedded", "images": {}, "missing_images": sorted(SAMPLE_MISSING_IMAGES)}
    for split in SPLITS:
        imgs, persons, others, captions = [], [], [], []
        for s, iid, w, h, spec, extra, _expected, has_file in _SAMPLE:
            if s != split:
                continue
            file_name = f"{iid:012d}.jpg"
            imgs.append({"license": 4, "file_name": file_name, "height": h, "width": w, "id": iid,
                         "coco_url": f"http://images.cocodataset.org/{split}2017/{file_name}",
                         "flickr_url": "", "date_captured": "2013-11-14 11:18:45"})
            anns = [_person(iid * 100 + k + 1, iid, kind, geom, face, w, h) for k, (kind, geom, face) in enumerate(spec)]
            persons += anns
            if extra == "dog":
                rle = mask_utils.merge(mask_utils.frPyObjects([_rect(60, 120, 200, 230)], h, w))
                others.append({"segmentation": [_rect(60, 120, 200, 230)], "area": float(mask_utils.area(rle)),
                               "iscrowd": 0, "image_id": iid, "bbox": [60.0, 120.0, 140.0, 110.0],
                               "category_id": 18, "id": iid * 100 + 50})
            for k in range(2 + iid % 4):
                captions.append({"image_id": iid, "id": iid * 10 + k, "caption": _CAPTIONS[(iid + k) % len(_CAPTIONS)]})
            if images and has_file:
                path = image_path(root, split, file_name)
                path.parent.mkdir(parents=True, exist_ok=True)
                _draw(w, h, anns + others, seed * 1000 + iid).save(path, quality=90)
        info = {"description": "facecontrol embedded COCO-format sample (drawn by code, not COCO images)",
                "version": "1.0", "year": 2017, "contributor": "facecontrol", "date_created": "2017/09/01"}
        licenses = [{"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"}]
        payloads = {
            "instances": {"info": info, "licenses": licenses, "images": imgs, "annotations": persons + others,
                          "categories": [{"supercategory": "person", "id": 1, "name": "person"}, DOG_CATEGORY]},
            "person_keypoints": {"info": info, "licenses": licenses, "images": imgs, "annotations": persons,
                                 "categories": [PERSON_CATEGORY]},
            "captions": {"info": info, "licenses": licenses, "images": imgs, "annotations": captions},
        }
        for kind, payload in payloads.items():
            write_json(annotation_path(root, kind, split), payload)
        summary["images"][split] = len(imgs)
    return summary


# ---------------------------------------------------------------- fetching

def annotations_complete(root: str | Path) -> list[Path]:
    """The annotation files missing under ``root`` (empty: complete)."""
    return [p for p in (annotation_path(root, k, s) for k in KINDS for s in SPLITS) if not p.is_file()]


def fetch_annotations(out: Path, source: str, url: str | None = None, local_dir: str | Path | None = None,
                      sha256: str | None = None, md5: str | None = None,
                      cache: Path = Path("data/cache/downloads")) -> dict:
    """Fill ``out/annotations/`` from the official zip (``source='official'``: verified, extracted beside it and
    swapped in, its SOURCE.json written) or a local COCO folder (``source='local'``:
    ``local_dir/annotations/*.json``); return a SOURCE dict."""
    dest = Path(out) / "annotations"
    names = [annotation_path(".", k, s).name for k in KINDS for s in SPLITS]
    if source == "official":
        def complete(folder: Path) -> dict:
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise DownloadError(f"{url}: the zip lacks {', '.join(missing)}")
            return {}

        return install_archive(url, Path(cache) / Path(url).name, dest, sha256=sha256, md5=md5, check=complete,
                               info={"license": LICENSE})
    if source != "local":
        raise ValueError(f"unknown annotation source {source!r}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = Path(local_dir) / "annotations" / name
        if not src.is_file():
            raise FileNotFoundError(f"{src} is missing: fetch_coco.local_dir must hold COCO's annotations/")
        shutil.copyfile(src, dest / name)
    return {"source": "local", "local_dir": str(local_dir), "license": LICENSE}


def _valid_image(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


def _fetch_one(job: tuple[str, dict, Path, str, Path | None]) -> tuple[str, int, str, str]:
    """One image: ``(split, image_id, status, detail)``; status present | fetched | missing | failed."""
    split, img, out, source, local_dir = job
    dest = image_path(out, split, img["file_name"])
    if dest.is_file() and _valid_image(dest):
        return split, int(img["id"]), "present", ""
    dest.unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source == "local":
        src = image_path(local_dir, split, img["file_name"])
        if not src.is_file():
            return split, int(img["id"]), "missing", f"{split}2017/{img['file_name']} not in the source folder"
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    else:
        url = img.get("coco_url")
        if not url:
            return split, int(img["id"]), "missing", "no coco_url"
        if url.startswith(HTTPS_HOSTS):
            url = "https://" + url.removeprefix("http://")
        try:
            download(url, dest, progress=False)
        except DownloadError as exc:
            return split, int(img["id"]), "failed", str(exc)
    if not _valid_image(dest):
        dest.unlink(missing_ok=True)
        return split, int(img["id"]), "failed", "not a decodable image"
    return split, int(img["id"]), "fetched", ""


def fetch_images(wanted: Iterable[tuple[str, dict]], out: Path, source: str, local_dir: str | Path | None = None,
                 num_workers: int = 8, prune: bool = True) -> dict:
    """Put each ``(split, image entry)`` at ``out/{split}2017/{file_name}``; return counts and failures.

    ``source``: ``local`` copies from ``local_dir/{split}2017/``; ``url`` downloads ``coco_url`` (over https for
    images.cocodataset.org; COCO publishes no per-image checksum, so each is verified by its Content-Length and
    by decoding it: ``verified: size-only`` in the result). Files
    already there that decode are kept, so an interrupted run resumes; with ``prune``, files of images no
    longer wanted are removed. Missing or failed images are listed, never raised.
    """
    if source not in ("local", "url"):
        raise ValueError(f"unknown image source {source!r}")
    out = Path(out)
    jobs = [(split, img, out, source, Path(local_dir) if local_dir is not None else None) for split, img in wanted]
    counts = {"present": 0, "fetched": 0, "missing": 0, "failed": 0}
    problems: dict[str, dict[str, str]] = {s: {} for s in SPLITS}
    if num_workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(num_workers) as pool:
            results = list(pool.map(_fetch_one, jobs))
    else:
        results = [_fetch_one(j) for j in jobs]
    for split, iid, status, detail in results:
        counts[status] += 1
        if status in ("missing", "failed"):
            problems[split][str(iid)] = f"{status}: {detail}"
    if prune:
        keep = {image_path(out, s, img["file_name"]) for s, img, *_ in jobs}
        for split in SPLITS:
            folder = out / f"{split}2017"
            if folder.is_dir():
                for p in folder.iterdir():
                    if p not in keep:
                        p.unlink()
    return {"counts": counts, "problems": {s: dict(sorted(v.items(), key=lambda kv: int(kv[0])))
                                           for s, v in problems.items()},
            **({"verified": "size-only (Content-Length) + decoded"} if source == "url" else {})}


# --- a synthetic annotation file of COCO's size (the selection benchmark) ---

PERSON_IMAGE_SHARE = 64115 / 118287  # train2017 images with at least one person


def write_synthetic_annotations(path: Path, num_images: int, num_persons: int, seed: int = 0) -> dict:
    """Write a synthetic person_keypoints file of the given size; return its counts and size in bytes."""
    rng = np.random.default_rng(seed)
    n_with = max(1, min(num_images, round(num_images * PERSON_IMAGE_SHARE)))
    per = np.ones(n_with, np.int64)
    extra = num_persons - n_with
    if extra > 0:  # skewed like COCO: most images hold few people, some many
        per += np.bincount(rng.choice(n_with, extra, p=_skew(n_with, rng)), minlength=n_with)
    owners = np.repeat(rng.choice(num_images, n_with, replace=False) + 1, per)[:num_persons]
    widths = rng.choice([640, 640, 500, 427, 480], num_images)
    heights = np.where(widths == 640, rng.choice([480, 427, 360], num_images), 640)
    images = [{"license": 1, "file_name": f"{i:012d}.jpg", "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg",
               "height": int(heights[i - 1]), "width": int(widths[i - 1]), "date_captured": "2013-11-14 11:18:45",
               "flickr_url": "", "id": i} for i in range(1, num_images + 1)]
    anns = []
    for k, iid in enumerate(owners.tolist()):
        w, h = int(widths[iid - 1]), int(heights[iid - 1])
        scale = float(np.exp(rng.uniform(np.log(8), np.log(0.45 * min(w, h)))))
        cx, cy = rng.uniform(scale, w - scale), rng.uniform(scale, h - scale)
        crowd = rng.random() < 0.01
        if crowd:
            x0, y0, x1, y1 = int(cx - scale), int(cy - scale / 2), int(cx + scale), int(cy + scale / 2)
            counts, pos = [], 0
            for x in range(x0, x1):  # column-major runs of a rectangle
                start = x * h + y0
                counts += [start - pos, y1 - y0]
                pos = start + (y1 - y0)
            counts.append(w * h - pos)
            segm: object = {"counts": counts, "size": [h, w]}
            kps = [0] * 51
        else:
            n = int(rng.integers(8, 41))
            t = np.sort(rng.uniform(0, 2 * np.pi, n))
            r = scale * rng.uniform(0.6, 1.0, n)
            poly = np.stack([np.clip(cx + 0.5 * r * np.cos(t), 0, w), np.clip(cy + r * np.sin(t), 0, h)], 1)
            segm = [np.round(poly.ravel(), 2).tolist()]
            kp = np.stack([rng.uniform(cx - scale / 2, cx + scale / 2, 17), rng.uniform(cy - scale, cy + scale, 17),
                           rng.choice([0, 1, 2], 17, p=[0.4, 0.1, 0.5])], 1)
            kp[kp[:, 2] == 0, :2] = 0
            kps = [int(v) if j % 3 == 2 else round(float(v), 1) for j, v in enumerate(kp.ravel())]
        area = float(np.pi * 0.5 * scale * scale * 0.8) if not crowd else float(2 * scale * scale)
        anns.append({"segmentation": segm, "num_keypoints": int(sum(1 for v in kps[2::3] if v > 0)), "area": area,
                     "iscrowd": int(crowd), "keypoints": kps, "image_id": iid,
                     "bbox": [round(cx - scale / 2, 2), round(cy - scale, 2), round(scale, 2), round(2 * scale, 2)],
                     "category_id": 1, "id": 900000 + k})
    payload = {"info": {"description": "synthetic, facecontrol bench"}, "licenses": [], "images": images,
               "annotations": anns, "categories": [{"supercategory": "person", "id": 1, "name": "person"}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, separators=(",", ":"))
    return {"num_images": num_images, "images_with_persons": n_with, "num_persons": len(anns),
            "file_bytes": path.stat().st_size}


def _skew(n: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.pareto(2.0, n) + 1.0
    return w / w.sum()
