"""Assemble the landmark-conditioned FaceSynthetics dataset for ControlNet training.

Joins the annotate (SPIGA) and caption shards on id, draws each conditioning image ("spiga_seg" style)
from SPIGA's landmarks, and writes a Hugging Face parquet dataset with its card to
data/datasets/facesynthetics_spiga/ (columns: pipelines.facesynthetics_dataset.SCHEMA, `face_box` as
[x1, y1, x2, y2] px; splits `train` and `validation` by the shared hash rule, pipelines.hfdata.hash_split: the
`assemble.validation_count` ids with the smallest sha1), plus reports/datasets/facesynthetics_spiga.json
(numbers) and its .provenance.json (models, params, data source).
diffusers' train_controlnet.py reads it with --dataset_name=data/datasets/facesynthetics_spiga (its
default columns image, conditioning_image, text).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pipelines.facesynthetics_dataset import AssemblyOptions, assemble_dataset
from stages import config as C

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "base.image_size", "assemble")

log = logging.getLogger(__name__)

RAW_DIR = Path("data/raw/facesynthetics")
ANNOTATIONS_DIR = Path("data/interim/facesynthetics/annotations")
CAPTIONS_DIR = Path("data/interim/facesynthetics/captions")
OUT_DIR = Path("data/datasets/facesynthetics_spiga")
REPORT = Path("reports/datasets/facesynthetics_spiga.json")


@dataclasses.dataclass(frozen=True)
class AssembleConfig:
    """The ``assemble`` section of params.yaml."""

    line_width: int  # conditioning stroke width at 512 px
    validation_count: int  # rows held out as `validation` (capped at the rows kept)
    nme_failure_threshold: float  # NME above this counts as a landmark failure in the report
    rows_per_file: int  # rows per parquet file
    num_workers: int  # drawing processes (0: in the main process)

    def validate(self, prefix: str) -> None:
        """Raise :class:`stages.config.ParamError` naming the first bad value."""
        C.positive(prefix, line_width=self.line_width, rows_per_file=self.rows_per_file,
                   nme_failure_threshold=self.nme_failure_threshold)
        for name in ("validation_count", "num_workers"):
            if getattr(self, name) < 0:
                raise C.ParamError(f"{prefix}.{name}: must be >= 0, got {getattr(self, name)!r}")


def assemble(base: C.Base, cfg: AssembleConfig, raw_dir: Path = RAW_DIR, annotations_dir: Path = ANNOTATIONS_DIR,
             captions_dir: Path = CAPTIONS_DIR, out_dir: Path = OUT_DIR, report_path: Path = REPORT) -> dict:
    """Build the dataset and its report from the stage's parameters; return the report."""
    opts = AssemblyOptions(image_size=base.image_size, **dataclasses.asdict(cfg))
    return assemble_dataset(opts, raw_dir, annotations_dir, captions_dir, out_dir, report_path,
                            params={"base": dataclasses.asdict(base), "assemble": dataclasses.asdict(cfg)})


def main(argv: list[str] | None = None) -> None:
    """Run the stage (``argv``: the command line, for tests)."""
    args = C.cli(__doc__, argv)
    base, cfg = C.load(AssembleConfig, "assemble", C.read_params(args.params, PARAMS), args.profile)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = assemble(base, cfg)
    log.info("wrote %s: %s rows, %d skipped %s; NME mean %s", OUT_DIR, report["rows"], report["skipped_total"],
             report["skipped"], report["landmark_nme"]["mean"])


if __name__ == "__main__":
    C.run(main)
