"""Stage celeba: CelebA at 64x64 with its 40 binary attributes, as a Hugging Face parquet dataset.

Source (``celeba.source``): ``folder``, CelebA's official aligned images and lists in torchvision's layout
(``<folder>/celeba/img_align_celeba/*.jpg``, ``list_attr_celeba.txt``, ``list_eval_partition.txt``; CelebA's
agreement allows non-commercial research only and its files come from its own site, not from here), or
``embedded``, faces rendered by code whose rendered attributes are real properties of the pictures
(:func:`pipelines.sources.celeba.write_sample`), so that every number made from them measures something.

Images: the centred square crop, then Lanczos to ``image_size`` (:func:`pipelines.celeba.square_resize`);
attributes 0/1 in the official order; the official train/validation/test partition kept; unreadable or
unlisted files skipped and counted by reason. Writes data/datasets/celeba/ (card included) and
reports/datasets/celeba.json (rows per split, skips) with its .provenance.json (prevalence, rules, source).
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Literal

from pipelines.celeba import build_celeba_dataset
from pipelines.reports import provenance, split_report, write_report
from pipelines.sources.celeba import write_sample
from stages import config as C

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "base.seed", "celeba")

OUT_DIR = Path("data/datasets/celeba")
REPORT = Path("reports/datasets/celeba.json")
REPORT_METRICS = ("rows", "skipped", "skipped_total", "uses_standin_models")


@dataclasses.dataclass(frozen=True)
class CelebAConfig:
    """The ``celeba`` section of params.yaml."""

    source: Literal["embedded", "folder"]
    folder: str | None  # folder: the root of torchvision's layout (holding celeba/) or the celeba/ folder itself
    num_faces: int  # embedded: faces rendered (plus two broken entries, skipped and counted)
    image_size: int
    rows_per_file: int
    max_per_split: int | None = None  # at most this many rows per split (None: all)

    def validate(self, prefix: str) -> None:
        """Raise :class:`stages.config.ParamError` naming the first bad value."""
        C.positive(prefix, num_faces=self.num_faces, image_size=self.image_size, rows_per_file=self.rows_per_file)
        if self.max_per_split is not None:
            C.positive(prefix, max_per_split=self.max_per_split)
        if self.source == "folder" and not self.folder:
            raise C.ParamError(f"{prefix}.folder: source 'folder' needs the CelebA folder (torchvision's layout)")


def build(base: C.Base, cfg: CelebAConfig, out_dir: Path = OUT_DIR, report_path: Path = REPORT) -> dict:
    """Build the dataset and its report from the configured source; return the report."""
    params = {"base": dataclasses.asdict(base), "celeba": dataclasses.asdict(cfg)}
    with tempfile.TemporaryDirectory(prefix="celeba-sample-") as tmp:
        if cfg.source == "embedded":
            root = Path(tmp)
            sample = {k: v for k, v in write_sample(root, cfg.num_faces, seed=base.seed).items() if k != "layout"}
            note = ("faces rendered by code (pipelines/sources/celeba.py), not CelebA: only the rendered attributes "
                    f"vary ({', '.join(sample['rendered_attributes'])}); every other attribute is 0")
        else:
            root, sample = Path(cfg.folder), None
            if not root.is_dir():
                raise FileNotFoundError(f"celeba.folder {root} is not a directory")
            note = f"CelebA (aligned and cropped images) from {root}; non-commercial research use only"
        report = build_celeba_dataset(root, out_dir, image_size=cfg.image_size, rows_per_file=cfg.rows_per_file,
                                      max_per_split=cfg.max_per_split, source_note=note)
    report["source"] = {"kind": cfg.source, "note": note, "sample": sample}
    report["uses_standin_models"] = False  # no model runs here (the embedded faces are labelled as such above)
    report.update(provenance([], params=params))
    write_report(report_path, *split_report(report, REPORT_METRICS))
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the stage (``argv``: the command line, for tests)."""
    args = C.cli(__doc__, argv)
    base, cfg = C.load(CelebAConfig, "celeba", C.read_params(args.params, PARAMS), args.profile)
    report = build(base, cfg)
    print(f"celeba: rows {report['rows']}; skipped {report['skipped']} -> {OUT_DIR}")


if __name__ == "__main__":
    C.run(main)
