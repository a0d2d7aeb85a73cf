"""Stage annotate: SPIGA 68-point landmarks and head pose for every FaceSynthetics face.

Reads data/raw/facesynthetics and data/models/spiga; writes parquet shards under
data/interim/facesynthetics/annotations/ (resumable: a killed run keeps its whole shards) and a
summary.json beside them. The face box is the original rule (the sample's own 70 landmarks, grown by
annotate.box_margin); a box mostly off the image is skipped as box_off_image. Several GPUs:
`accelerate launch -m stages.annotate` (each process does its shards; the main process writes the summary).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pipelines.faces.annotate import ANNOTATION_SCHEMA, load_face, spiga_batch_fn
from pipelines.faces.spiga import SpigaAnnotator
from pipelines.reports import read_model_manifest
from pipelines.runtime import init_runtime
from pipelines.shards import ShardedMap, write_summary
from pipelines.sources.facesynthetics import list_samples
from stages import config

log = logging.getLogger("stages.annotate")

RAW_DIR = Path("data/raw/facesynthetics")
MODEL_DIR = Path("data/models/spiga")
OUT_DIR = Path("data/interim/facesynthetics/annotations")


@dataclass(frozen=True)
class AnnotateConfig:
    """The ``annotate`` section of params.yaml."""

    box_margin: float  # px added on every side of the landmarks' min/max box
    min_box_inside: float  # skip a face whose box has less than this share of its area inside the image
    precision: Literal["auto", "fp32", "fp16", "bf16"]
    batch_size: int
    num_workers: int
    shard_size: int

    def validate(self, prefix: str) -> None:
        """Reject values that cannot work, naming the key."""
        config.positive(prefix, batch_size=self.batch_size, shard_size=self.shard_size)
        if self.num_workers < 0:
            raise config.ParamError(f"{prefix}.num_workers: must be >= 0, got {self.num_workers!r}")
        if self.box_margin < 0:
            raise config.ParamError(f"{prefix}.box_margin: must be >= 0, got {self.box_margin!r}")
        if not 0 < self.min_box_inside <= 1:
            raise config.ParamError(f"{prefix}.min_box_inside: must be in (0, 1], got {self.min_box_inside!r}")


def main(argv: list[str] | None = None) -> dict | None:
    """Run the stage; return the summary (main process) or None (other processes)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = config.cli(__doc__, argv)
    base, cfg = config.load(AnnotateConfig, "annotate", params=config.read_params(args.params), profile=args.profile)
    runtime = init_runtime(base.device, cfg.precision, base.seed)

    samples = list_samples(RAW_DIR)
    info = read_model_manifest(MODEL_DIR)
    annotator = SpigaAnnotator.load(MODEL_DIR / info.id, runtime.device, runtime.precision)
    run_config = {"model": {"id": info.id, "revision": info.revision}, "precision": runtime.precision,
                  "box_margin": cfg.box_margin, "min_box_inside": cfg.min_box_inside, "image_size": base.image_size}
    result = ShardedMap(OUT_DIR, ANNOTATION_SCHEMA, shard_size=cfg.shard_size).run(
        samples, [s.id for s in samples],
        functools.partial(load_face, image_size=base.image_size, box_margin=cfg.box_margin,
                          min_box_inside=cfg.min_box_inside),
        spiga_batch_fn(annotator), run_config, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        process_index=runtime.process_index, num_processes=runtime.num_processes, desc="annotate",
        wait=runtime.wait_for_everyone,
    )
    if not runtime.is_main_process:
        return None
    summary = write_summary(OUT_DIR, result, model=info.to_dict(), runtime=runtime.describe(),
                            config={**asdict(cfg), "image_size": base.image_size},
                            num_processes=runtime.num_processes)
    c, rate = summary["counts"], (summary["throughput"] or {}).get("items_per_second")
    log.info("annotate: %d rows, %d ok, %d failed %s; this run %d items%s, %d shards reused%s", c["rows"], c["ok"],
             c["failed"], c["failed_by_reason"], result.items_processed,
             f" at {rate:.2f}/s" if result.items_processed and rate else "", result.shards_reused,
             " (STAND-IN SPIGA: random weights, landmarks mean nothing)" if info.standin else "")
    return summary


if __name__ == "__main__":
    config.run(main)
