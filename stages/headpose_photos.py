"""Stage headpose_photos: head-pose labels for real photographs (an image folder or a Hugging Face dataset).

Faces are found by dlib's HOG frontal detector (weights ship in the dlib package; score cut
`detector_threshold`); SPIGA runs on the detected box; both estimators (spiga, pnp) label each face.
Rule for an image's detections: none -> counted `no_face`, skipped; one -> kept; several -> the largest is kept
when its area is >= `multiple_faces_dominance` x the second's (counted), else the image is skipped (counted).
Writes data/datasets/headpose_<name>/ (HF parquet dataset, one split `train`, columns pipelines.headpose.SCHEMA
with `face_box` as [x1, y1, x2, y2] px; card; yaw/pitch histograms).
Sample profile: a folder made by code from the real photo matplotlib ships (grace_hopper.jpg), a two-face
and a big-and-small-face composite of it, a face-free image and two rendered faces.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from pipelines import images
from pipelines.faces.spiga import SpigaAnnotator
from pipelines.headpose import (
    UNREADABLE,
    label_face,
    png_bytes,
    select_face,
    spiga_on_boxes,
    write_headpose_dataset,
)
from pipelines.metrics.control import DlibHogDetector
from pipelines.reports import read_model_manifest, write_json
from pipelines.runtime import init_runtime
from stages import config as C
from stages.schemas.headpose import DirectionThresholds

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "base.seed", "base.device", "headpose_photos")

log = logging.getLogger("stages.headpose_photos")

MODEL_DIR = Path("data/models/spiga")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class HeadposePhotosConfig:
    """The ``headpose_photos`` section of params.yaml."""

    name: str  # the dataset is data/datasets/headpose_<name>
    source: Literal["embedded", "folder", "hf"]
    direction_thresholds: DirectionThresholds
    detector_threshold: float  # dlib HOG score cut (it fires on patches below ~0.5)
    detector_upsample: int  # dlib pyramid upsampling (0: faces >= ~80 px)
    multiple_faces_dominance: float  # keep the largest of several faces when its area >= this x the second's
    batch_size: int
    rows_per_file: int
    folder: str | None = None  # source folder
    hf_dataset: str | None = None  # source hf: dataset id (e.g. a CelebA variant)
    hf_revision: str = "main"  # source hf: a commit (40 hex) or a branch, resolved to its commit when the stage runs
    hf_split: str = "train"
    hf_image_column: str = "image"
    max_images: int | None = None  # null: all

    def validate(self, prefix: str) -> None:
        """Name, source fields, and positive sizes."""
        C.positive(prefix, batch_size=self.batch_size, rows_per_file=self.rows_per_file,
                   multiple_faces_dominance=self.multiple_faces_dominance)
        if not self.name or not self.name.replace("_", "").isalnum():
            raise C.ParamError(f"{prefix}.name: must be letters, digits and _, got {self.name!r}")
        if self.source == "folder" and not self.folder:
            raise C.ParamError(f"{prefix}.folder: required when source is 'folder'")
        if self.source == "hf" and not self.hf_dataset:
            raise C.ParamError(f"{prefix}.hf_dataset: required when source is 'hf'")
        if self.multiple_faces_dominance < 1:
            raise C.ParamError(f"{prefix}.multiple_faces_dominance: must be >= 1, got {self.multiple_faces_dominance!r}")
        if self.max_images is not None and self.max_images < 1:
            raise C.ParamError(f"{prefix}.max_images: must be >= 1 or null, got {self.max_images!r}")


def write_embedded_folder(root: Path, seed: int = 0) -> list[str]:
    """The sample source folder; returns the file names written (sorted)."""
    import matplotlib.cbook as cbook

    from pipelines.sources.sample_faces import project_face, render_face

    root.mkdir(parents=True, exist_ok=True)
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        hopper = Image.open(fh).convert("RGB")
    hopper.save(root / "grace_hopper.jpg", quality=95)
    w, h = hopper.size
    pair = Image.new("RGB", (2 * w, h))
    pair.paste(hopper, (0, 0))
    pair.paste(hopper, (w, 0))
    pair.save(root / "two_faces.jpg", quality=95)  # two equal faces: skipped by the rule
    big_small = Image.new("RGB", (w + w // 2, h), (40, 40, 40))
    big_small.paste(hopper, (0, 0))
    big_small.paste(hopper.resize((w // 2, h // 2)), (w, h // 4))
    big_small.save(root / "big_and_small_face.jpg", quality=95)  # largest kept
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:384]
    Image.fromarray(np.stack([xx % 256, yy, (xx + yy) % 256], -1).astype(np.uint8)).save(root / "no_face.png")
    for k, (yaw, pitch) in enumerate([(0.0, 0.0), (25.0, 10.0)]):
        pts = project_face(yaw, pitch, 0.0, (256.0, 256.0), 0.5, 512)
        img, _ = render_face(pts, 512, rng)
        Image.fromarray(img).save(root / f"rendered_{k}.png")
    return sorted(p.name for p in root.iterdir())


def hub_dataset_commit(repo_id: str, revision: str) -> str:
    """The commit ``revision`` (a branch, tag or commit) of the Hub dataset ``repo_id`` is at now: the stage streams
    that commit and records it, so a run never reads a moving branch halfway."""
    from huggingface_hub import HfApi

    from pipelines.sources.downloads import DownloadError

    try:
        return HfApi().dataset_info(repo_id, revision=revision).sha
    except Exception as exc:  # offline, unknown repo or revision, gated: say which dataset
        raise DownloadError(f"{repo_id}@{revision}: cannot resolve the dataset revision on the Hugging Face Hub "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def iter_images(cfg: HeadposePhotosConfig, folder: Path | None,
                commit: str | None = None) -> Iterator[tuple[str, np.ndarray | None]]:
    """``(id, RGB uint8 image or None when unreadable)`` from the configured source, at most ``max_images``
    (source hf: the dataset at ``commit``, from :func:`hub_dataset_commit`)."""
    n = 0
    if cfg.source == "hf":
        import datasets

        ds = datasets.load_dataset(cfg.hf_dataset, split=cfg.hf_split, streaming=True, revision=commit)
        for k, ex in enumerate(ds):
            if cfg.max_images is not None and n >= cfg.max_images:
                return
            im = ex.get(cfg.hf_image_column)
            try:
                arr = np.asarray(images.to_rgb(im)[0]) if im is not None else None
            except images.ImageError:
                arr = None
            yield f"{k:08d}", arr
            n += 1
        return
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found")
    for p in sorted(q for q in folder.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES):
        if cfg.max_images is not None and n >= cfg.max_images:
            return
        try:
            arr = images.read(p)[0]
        except images.ImageError:
            arr = None
        yield p.relative_to(folder).as_posix(), arr
        n += 1


def build(base: C.Base, cfg: HeadposePhotosConfig, out_dir: Path | None = None, model_dir: Path = MODEL_DIR) -> dict:
    """Detect, label and write the dataset; return its summary."""
    out_dir = Path(out_dir or f"data/datasets/headpose_{cfg.name}")
    info = read_model_manifest(model_dir)
    runtime = init_runtime(base.device, "fp32", base.seed)
    annotator = SpigaAnnotator.load(model_dir / info.id, runtime.device)
    commit = hub_dataset_commit(cfg.hf_dataset, cfg.hf_revision) if cfg.source == "hf" else None
    detector = DlibHogDetector(cfg.detector_threshold, cfg.detector_upsample)
    thresholds = dataclasses.asdict(cfg.direction_thresholds)
    counts: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(cfg.folder) if cfg.folder else None
        if cfg.source == "embedded":
            folder = Path(tmp) / "photos"
            write_embedded_folder(folder, base.seed)
        kept: list[tuple[str, np.ndarray, np.ndarray]] = []
        for sid, image in iter_images(cfg, folder, commit):
            counts["images"] += 1
            if image is None:
                counts[UNREADABLE] += 1
                continue
            box, note = select_face(detector.detect(image), cfg.multiple_faces_dominance)
            if note:
                counts[note] += 1
            if box is not None:
                kept.append((sid, image, box))
    counts["faces_labelled"] = len(kept)
    source_note = {"embedded": "the embedded sample (grace_hopper.jpg from matplotlib, composites of it, a face-free "
                               "image, two rendered faces)",
                   "folder": f"image folder {cfg.folder}", "hf": f"Hugging Face dataset {cfg.hf_dataset} at commit {commit} ({cfg.hf_split})"}[cfg.source]

    def rows():
        for s in range(0, len(kept), cfg.batch_size):
            chunk = kept[s:s + cfg.batch_size]
            lms, hps = spiga_on_boxes(annotator, [c[1] for c in chunk], [c[2] for c in chunk], cfg.batch_size)
            for (sid, image, box), lm, hp in zip(chunk, lms, hps, strict=True):
                img = png_bytes(image)
                for lab in label_face(lm, hp, box, image.shape[1], image.shape[0], thresholds):
                    yield {**lab, "image": img, "source": cfg.source, "id": sid}

    rule = [f"Detection rule: dlib HOG frontal detector, score >= {cfg.detector_threshold}, upsample "
            f"{cfg.detector_upsample}; no face: skipped (`no_face`); several: the largest kept when its area is >= "
            f"{cfg.multiple_faces_dominance} x the second's (`multiple_faces_kept_largest`), else skipped "
            "(`multiple_faces_skipped`)."]
    summary = write_headpose_dataset(rows(), out_dir, pretty_name=f"Head pose ({cfg.name})", source_note=source_note,
                                     counts=dict(counts), thresholds=thresholds, uses_standin=info.standin,
                                     rows_per_file=cfg.rows_per_file, extra_lines=rule)
    summary["params"] = {"base": dataclasses.asdict(base), "headpose_photos": dataclasses.asdict(cfg)}
    summary["source_commit"] = commit  # source hf: the dataset commit streamed
    summary["runtime"] = runtime.describe()
    write_json(out_dir / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Run the stage (``argv``: the command line, for tests)."""
    args = C.cli(__doc__, argv)
    base, cfg = C.load(HeadposePhotosConfig, "headpose_photos", C.read_params(args.params, PARAMS), args.profile)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = build(base, cfg)
    log.info("wrote headpose_%s: %d rows, counts %s", cfg.name, summary["rows"], summary["counts"])
    return summary


if __name__ == "__main__":
    C.run(main)
