"""Stage annotate: SPIGA 68-point landmarks and head pose for every FaceSynthetics face.

Reads data/raw/facesynthetics and data/models/spiga; writes parquet shards under
data/interim/facesynthetics/annotations/ (resumable: a killed run keeps its whole shards) and a
summary.json beside them (no timings: data), plus reports/bench/annotate.json (this run's items/s and shard
reuse, with its .provenance.json). The face box is the original rule (the sample's own 70 landmarks, grown by
annotate.box_margin); a box mostly off the image is skipped as box_off_image. A rerun remakes only the shards
whose raw files (image, landmarks) changed or that do not verify; a second run on the same output fails at
once (pipelines/shards.py). Several GPUs:
`accelerate launch -m stages.annotate` (each process does its shards; the main process writes the summary).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import asdict
from pathlib import Path

from pipelines.faces.annotate import ANNOTATION_SCHEMA, face_inputs, load_face, spiga_batch_fn
from pipelines.faces.spiga import SpigaAnnotator
from pipelines.reports import read_model_manifest
from pipelines.runtime import init_runtime
from pipelines.shards import ShardedMap, output_lock, write_summary
from pipelines.sources.facesynthetics import list_samples
from stages import config
from stages.schemas.annotate import AnnotateConfig

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "base.seed", "base.device", "base.image_size", "annotate")

log = logging.getLogger("stages.annotate")

RAW_DIR = Path("data/raw/facesynthetics")
MODEL_DIR = Path("data/models/spiga")
OUT_DIR = Path("data/interim/facesynthetics/annotations")
RUN_REPORT = Path("reports/bench/annotate.json")  # this run's items/s and shard reuse (not data: it varies)


def main(argv: list[str] | None = None) -> dict | None:
    """Run the stage; return the summary (main process) or None (other processes)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = config.cli(__doc__, argv)
    base, cfg = config.load(AnnotateConfig, "annotate", params=config.read_params(args.params, PARAMS), profile=args.profile)
    runtime = init_runtime(base.device, cfg.precision, base.seed)

    samples = list_samples(RAW_DIR)
    info = read_model_manifest(MODEL_DIR)
    annotator = SpigaAnnotator.load(MODEL_DIR / info.id, runtime.device, runtime.precision)
    run_config = {"model": {"id": info.id, "revision": info.revision}, "precision": runtime.precision,
                  "box_margin": cfg.box_margin, "min_box_inside": cfg.min_box_inside, "image_size": base.image_size}
    with output_lock(OUT_DIR, runtime.is_main_process):  # one run at a time, until its summary is written
        result = ShardedMap(OUT_DIR, ANNOTATION_SCHEMA, shard_size=cfg.shard_size).run(
            samples, [s.id for s in samples],
            functools.partial(load_face, image_size=base.image_size, box_margin=cfg.box_margin,
                              min_box_inside=cfg.min_box_inside),
            spiga_batch_fn(annotator), run_config, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
            process_index=runtime.process_index, num_processes=runtime.num_processes, desc="annotate",
            wait=runtime.wait_for_everyone, inputs=face_inputs,
        )
        if not runtime.is_main_process:
            return None
        summary = write_summary(OUT_DIR, result, model=info.to_dict(), runtime=runtime.describe(),
                                config={**asdict(cfg), "image_size": base.image_size},
                                num_processes=runtime.num_processes, run_report=RUN_REPORT)
    c, rate = summary["counts"], (summary["throughput"] or {}).get("items_per_second")
    log.info("annotate: %d rows, %d ok, %d failed %s; this run %d items%s, %d shards reused%s", c["rows"], c["ok"],
             c["failed"], c["failed_by_reason"], result.items_processed,
             f" at {rate:.2f}/s" if result.items_processed and rate else "", result.shards_reused,
             " (STAND-IN SPIGA: random weights, landmarks mean nothing)" if info.standin else "")
    return summary


if __name__ == "__main__":
    config.run(main)
