"""Stage reference_stats: Inception statistics of the real images of the evaluation split (clean-fid, mode clean).

Reads data/datasets/facesynthetics_spiga (the ``reference_stats.split`` split) and data/models/inception;
writes data/metrics/reference/facesynthetics_spiga_<split>.npz (features, mu, sigma) and .json (its sha256,
count, implementation, mode, feature layer, image size, model). The statistics stay in the project as a
DVC output, never in clean-fid's package folder. With the stand-in Inception the features are meaningless.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.metrics.fid import reference_paths, reference_statistics
from pipelines.reports import provenance, read_model_manifest, write_json
from pipelines.runtime import init_runtime
from stages.config import ParamError, cli, load, positive, read_params, run

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "base.seed", "base.device", "reference_stats")

DATASET_DIR = Path("data/datasets/facesynthetics_spiga")
MODEL_DIR = Path("data/models/inception")
OUT_DIR = Path("data/metrics/reference")
NAME = "facesynthetics_spiga"
log = logging.getLogger("stages.reference_stats")


@dataclass(frozen=True)
class ReferenceStatsConfig:
    """The ``reference_stats`` section of params.yaml."""

    split: str
    batch_size: int
    num_workers: int

    def validate(self, prefix: str = "reference_stats") -> None:
        """Reject sizes that cannot work."""
        positive(prefix, batch_size=self.batch_size)
        if self.num_workers < 0:
            raise ParamError(f"{prefix}.num_workers: must be >= 0, got {self.num_workers!r}")
        if not self.split or "/" in self.split:
            raise ParamError(f"{prefix}.split: not a split name: {self.split!r}")


def main(argv: list[str] | None = None) -> dict:
    """Run the stage; returns the JSON description written beside the npz."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = cli(__doc__, argv)
    base, cfg = load(ReferenceStatsConfig, "reference_stats", read_params(args.params, PARAMS), args.profile)
    runtime = init_runtime(base.device, "fp32", base.seed)
    model = read_model_manifest(MODEL_DIR)
    npz, js = reference_paths(OUT_DIR, NAME, cfg.split)
    ref = reference_statistics(DATASET_DIR, cfg.split, MODEL_DIR, npz, batch_size=cfg.batch_size,
                               num_workers=cfg.num_workers, device=runtime.device)
    rate = ref.pop("images_per_second")
    report = {"dataset": str(DATASET_DIR), "file": npz.name, **ref, "model": model.to_dict(),
              **provenance([model], params=asdict(cfg))}
    if model.standin:
        report["note"] = "STAND-IN Inception (random weights): these statistics are comparable to nothing"
    write_json(js, report)
    log.info("reference_stats: %d images of %s/%s -> %s (sha256 %s…), %.1f images/s on %s%s", ref["count"],
             DATASET_DIR.name, cfg.split, npz, ref["sha256"][:12], rate or 0.0, runtime.device,
             " (STAND-IN Inception: features mean nothing)" if model.standin else "")
    return report


if __name__ == "__main__":
    run(main)
