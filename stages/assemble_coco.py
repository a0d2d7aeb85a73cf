"""Stage assemble_coco: the COCO humans Hugging Face dataset and its report.

Reads the selection (data/interim/coco_humans/selection.json), the annotations (data/raw/coco/annotations/)
and the selected images (data/raw/coco/images/); writes data/datasets/coco_humans/ (splits train and
validation: COCO's own train2017 and val2017; columns pipelines.coco_humans.SCHEMA: image, person_mask,
face_boxes as [x1, y1, x2, y2] px, text, image_id, person_area_fraction, num_persons; card)
and reports/datasets/coco_humans.json (counts per split, what was kept and skipped) with its .provenance.json
(what each rule removed in order, the rules, the image fetch, data source, params).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pipelines.coco_humans import REPORT_METRICS, FaceBoxRule, assemble_coco_humans
from pipelines.reports import provenance, read_json, split_report, write_report
from pipelines.sources.coco import load_coco
from stages import config as C

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "assemble_coco")

ROOT = Path("data/raw/coco")
IMAGES = Path("data/raw/coco/images")
SELECTION = Path("data/interim/coco_humans/selection.json")
OUT_DIR = Path("data/datasets/coco_humans")
REPORT = Path("reports/datasets/coco_humans.json")


@dataclasses.dataclass(frozen=True)
class AssembleCocoConfig:
    """The ``assemble_coco`` section of params.yaml."""

    face_box_scale: float  # face box side = scale x the longer side of the face keypoints' box
    min_face_size: float  # px: the smallest face box side
    rows_per_file: int  # rows per parquet file

    def validate(self, prefix: str) -> None:
        """Raise :class:`stages.config.ParamError` naming the first bad value."""
        C.positive(prefix, face_box_scale=self.face_box_scale, min_face_size=self.min_face_size,
                   rows_per_file=self.rows_per_file)


def assemble(base: C.Base, cfg: AssembleCocoConfig, root: Path = ROOT, images: Path = IMAGES,
             selection_path: Path = SELECTION, out_dir: Path = OUT_DIR, report_path: Path = REPORT) -> dict:
    """Build the dataset and its report; return the report."""
    if not selection_path.is_file():
        raise FileNotFoundError(f"{selection_path} is missing: run the select_coco stage first")
    selection = read_json(selection_path)
    rule = selection["rule"]
    face_rule = FaceBoxRule(min_face_keypoints=rule["min_face_keypoints"], face_visibility=rule["face_visibility"],
                            face_box_scale=cfg.face_box_scale, min_face_size=cfg.min_face_size)
    src_path = root / "annotations" / "SOURCE.json"
    source = read_json(src_path) if src_path.is_file() else {}
    img_src = images / "SOURCE.json"
    report = assemble_coco_humans(selection, root, images, out_dir, face_rule, cfg.rows_per_file, load_coco, source)
    report["image_fetch"] = read_json(img_src) if img_src.is_file() else None
    report.update(provenance([], params={"base": dataclasses.asdict(base), "assemble_coco": dataclasses.asdict(cfg)}))
    write_report(report_path, *split_report(report, REPORT_METRICS))
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the stage (``argv``: the command line, for tests)."""
    args = C.cli(__doc__, argv)
    base, cfg = C.load(AssembleCocoConfig, "assemble_coco", C.read_params(args.params, PARAMS), args.profile)
    report = assemble(base, cfg)
    print(f"assemble_coco: rows {report['rows']}; skipped {report['skipped']} -> {OUT_DIR}")


if __name__ == "__main__":
    C.run(main)
