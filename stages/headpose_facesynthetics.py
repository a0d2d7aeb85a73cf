"""Stage headpose_facesynthetics: head-pose labels for every FaceSynthetics face, from the annotate shards.

Reads data/interim/facesynthetics/annotations (SPIGA landmarks, head pose and face box per face: nothing is
annotated again) and the raw images in data/raw/facesynthetics; writes data/datasets/headpose_facesynthetics/
(HF parquet dataset, one split `train`, one row per face per estimator `spiga` / `pnp`, columns
pipelines.headpose.SCHEMA with `face_box` as [x1, y1, x2, y2] px; card with the yaw/pitch histograms).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from pipelines.headpose import label_face, png_bytes, write_headpose_dataset
from pipelines.reports import read_json, write_json
from pipelines.shards import read_shards, read_summary
from pipelines.sources.facesynthetics import SampleError, read_image, sample_paths
from stages import config as C
from stages.schemas.headpose import DirectionThresholds

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "headpose_facesynthetics")

log = logging.getLogger("stages.headpose_facesynthetics")

RAW_DIR = Path("data/raw/facesynthetics")
ANNOTATIONS_DIR = Path("data/interim/facesynthetics/annotations")
OUT_DIR = Path("data/datasets/headpose_facesynthetics")


@dataclasses.dataclass(frozen=True)
class HeadposeFaceSyntheticsConfig:
    """The ``headpose_facesynthetics`` section of params.yaml."""

    direction_thresholds: DirectionThresholds
    rows_per_file: int

    def validate(self, prefix: str) -> None:
        """rows_per_file must be > 0."""
        C.positive(prefix, rows_per_file=self.rows_per_file)


def build(base: C.Base, cfg: HeadposeFaceSyntheticsConfig, raw_dir: Path = RAW_DIR,
          annotations_dir: Path = ANNOTATIONS_DIR, out_dir: Path = OUT_DIR) -> dict:
    """Label every ok annotation row with both estimators and write the dataset; return its summary."""
    table = read_shards(annotations_dir)
    ann = read_summary(annotations_dir)
    standin = bool((ann.get("model") or {}).get("standin", False))
    thresholds = dataclasses.asdict(cfg.direction_thresholds)
    counts = {"annotation_rows": table.num_rows, "annotation_failed": 0, "unreadable_image": 0, "faces_labelled": 0}

    def rows():
        for r in table.to_pylist():
            if not r["ok"]:
                counts["annotation_failed"] += 1
                continue
            try:
                image = read_image(sample_paths(raw_dir, r["id"]).image_path)
            except SampleError:
                counts["unreadable_image"] += 1
                continue
            h, w = image.shape[:2]
            labels = label_face(np.asarray(r["landmarks"]), np.asarray(r["headpose"]), np.asarray(r["face_box"]),
                                w, h, thresholds)
            counts["faces_labelled"] += 1
            img = png_bytes(image)
            for lab in labels:
                yield {**lab, "image": img, "source": "facesynthetics", "id": r["id"]}

    source_path = raw_dir / "SOURCE.json"
    source = read_json(source_path) if source_path.is_file() else {}
    note = ("FaceSynthetics (annotate stage's SPIGA landmarks and pose)" if source.get("source") != "embedded"
            else "the embedded FaceSynthetics-format sample (faces rendered by code), not Microsoft FaceSynthetics")
    summary = write_headpose_dataset(rows(), out_dir, pretty_name="FaceSynthetics head pose", source_note=note,
                                     counts=counts, thresholds=thresholds, uses_standin=standin,
                                     rows_per_file=cfg.rows_per_file)
    summary["params"] = {"base": dataclasses.asdict(base), "headpose_facesynthetics": dataclasses.asdict(cfg)}
    write_json(out_dir / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Run the stage (``argv``: the command line, for tests)."""
    args = C.cli(__doc__, argv)
    base, cfg = C.load(HeadposeFaceSyntheticsConfig, "headpose_facesynthetics", C.read_params(args.params, PARAMS), args.profile)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = build(base, cfg)
    log.info("wrote %s: %d rows, counts %s", OUT_DIR, summary["rows"], summary["counts"])
    return summary


if __name__ == "__main__":
    C.run(main)
