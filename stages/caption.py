"""Stage caption: a BLIP caption per FaceSynthetics face, batched and resumable (parquet shards).

Reads data/raw/facesynthetics and data/models/blip; writes data/interim/facesynthetics/captions/
(shards + summary.json) and reports/bench/caption.json (this run's throughput). caption.method: none writes empty captions without loading any model.
A rerun remakes only the shards whose raw images changed or that do not verify; a second run on the same output
fails at once (pipelines/shards.py).
Several GPUs: `accelerate launch -m stages.caption`.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import asdict
from pathlib import Path

from pipelines.captions import (
    CAPTION_SCHEMA,
    BlipCaptioner,
    caption_batch_fn,
    caption_inputs,
    load_caption_input,
)
from pipelines.reports import ModelInfo, read_model_manifest
from pipelines.runtime import init_runtime
from pipelines.shards import ShardedMap, output_lock, write_summary
from pipelines.sources.facesynthetics import list_samples
from stages.config import cli, load, read_params, run
from stages.schemas.caption import CaptionConfig

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "base.seed", "base.device", "base.image_size", "caption")

RAW_DIR = Path("data/raw/facesynthetics")
MODEL_DIR = Path("data/models/blip")
OUT_DIR = Path("data/interim/facesynthetics/captions")
RUN_REPORT = Path("reports/bench/caption.json")  # this run's items/s and shard reuse (not data: it varies)
log = logging.getLogger("stages.caption")


def main(argv: list[str] | None = None) -> dict:
    """Run the stage; returns the summary written to ``summary.json`` (empty on non-main processes)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = cli(__doc__, argv)
    base, cfg = load(CaptionConfig, "caption", read_params(args.params, PARAMS), args.profile)
    runtime = init_runtime(base.device, cfg.precision, base.seed)
    samples = list_samples(RAW_DIR)

    model_info: ModelInfo | None = None
    captioner: BlipCaptioner | None = None
    if cfg.method == "blip":
        model_info = read_model_manifest(MODEL_DIR)
        captioner = BlipCaptioner.load(MODEL_DIR, runtime.device, runtime.precision)
    load_item = functools.partial(load_caption_input, image_size=base.image_size,
                                  image_processor=captioner.processor.image_processor if captioner else None)
    run_config = {"method": cfg.method, "precision": runtime.precision,
                  "model": None if model_info is None else {"id": model_info.id, "revision": model_info.revision}}
    with output_lock(OUT_DIR, runtime.is_main_process):  # one run at a time, until its summary is written
        result = ShardedMap(OUT_DIR, CAPTION_SCHEMA, cfg.shard_size).run(
            samples, [s.id for s in samples], load_item, caption_batch_fn(captioner), run_config,
            batch_size=cfg.batch_size, num_workers=cfg.num_workers,
            process_index=runtime.process_index, num_processes=runtime.num_processes,
            desc="caption", wait=runtime.wait_for_everyone, inputs=caption_inputs)
        if not runtime.is_main_process:
            return {}
        summary = write_summary(OUT_DIR, result, model=model_info.to_dict() if model_info else None,
                                runtime=runtime.describe(), config=asdict(cfg), num_processes=runtime.num_processes,
                                run_report=RUN_REPORT)
    c = summary["counts"]
    log.info("caption: %d rows, %d ok, %d failed %s%s", c["rows"], c["ok"], c["failed"], c["failed_by_reason"],
             " (STAND-IN BLIP: random weights, captions mean nothing)" if model_info and model_info.standin else "")
    return summary


if __name__ == "__main__":
    run(main)
