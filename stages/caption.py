"""Stage caption: a BLIP caption per FaceSynthetics face, batched and resumable (parquet shards).

Reads ``data/raw/facesynthetics`` and ``data/models/blip``; writes ``data/interim/facesynthetics/captions/``
(shards + ``summary.json``). ``caption.method: none`` writes empty captions without loading any model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa

from pipelines.reports import ModelInfo, read_model_manifest, write_json
from pipelines.runtime import init_runtime
from pipelines.shards import Failure, ShardedMap, read_shards, to_tensor_batch
from pipelines.sources.facesynthetics import FaceSample, SampleError, list_samples, read_image
from stages.config import ParamError, cli, load, positive, read_params

RAW_DIR = Path("data/raw/facesynthetics")
MODEL_DIR = Path("data/models/blip")
OUT_DIR = Path("data/interim/facesynthetics/captions")
SCHEMA = pa.schema([pa.field("text", pa.string())])
log = logging.getLogger("stages.caption")


@dataclass(frozen=True)
class CaptionConfig:
    """The ``caption`` section of params.yaml."""

    method: Literal["blip", "none"]
    precision: Literal["auto", "fp32", "fp16", "bf16"]
    batch_size: int
    num_workers: int
    shard_size: int

    def validate(self, prefix: str = "caption") -> None:
        """Reject sizes that cannot work."""
        positive(prefix, batch_size=self.batch_size, shard_size=self.shard_size)
        if self.num_workers < 0:
            raise ParamError(f"{prefix}.num_workers: must be >= 0, got {self.num_workers!r}")


def main(argv: list[str] | None = None) -> dict:
    """Run the stage; returns the summary written to ``summary.json``."""
    args = cli(__doc__, argv)
    base, cfg = load(CaptionConfig, "caption", read_params(args.params), args.profile)
    runtime = init_runtime(base.device, cfg.precision, base.seed)
    samples = list_samples(RAW_DIR)

    model_info: ModelInfo | None = None
    captioner = None
    if cfg.method == "blip":
        from pipelines.captions import BlipCaptioner

        model_info = read_model_manifest(MODEL_DIR)
        captioner = BlipCaptioner.load(MODEL_DIR, runtime.device, runtime.precision)

    def load_item(s: FaceSample) -> dict | Failure:
        try:
            image = read_image(s.image_path, size=base.image_size)
        except SampleError as e:
            return Failure(e.reason, e.detail)
        return {"pixel_values": captioner.preprocess(image)} if captioner is not None else {}

    def infer(batch: list[dict]) -> list[dict]:
        if captioner is None:
            return [{"text": ""} for _ in batch]
        texts = captioner.caption(to_tensor_batch([b["pixel_values"] for b in batch]))
        return [{"text": t} for t in texts]

    config = {"method": cfg.method, "precision": runtime.precision,
              "model": None if model_info is None else {"id": model_info.id, "revision": model_info.revision}}
    result = ShardedMap(OUT_DIR, SCHEMA, cfg.shard_size).run(
        samples, [s.id for s in samples], load_item, infer, config,
        batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        process_index=runtime.process_index, num_processes=runtime.num_processes,
        desc="caption", wait=runtime.wait_for_everyone)

    summary: dict = {}
    if runtime.is_main_process:
        table = read_shards(OUT_DIR).to_pydict()
        failed: dict[str, int] = {}
        for ok, err in zip(table["ok"], table["error"], strict=True):
            if not ok:
                failed[err] = failed.get(err, 0) + 1
        summary = {
            "method": cfg.method,
            "model": model_info.to_dict() if model_info is not None else None,
            "uses_standin_model": bool(model_info.standin) if model_info is not None else False,
            "runtime": runtime.describe(),
            "batch_size": cfg.batch_size,
            "rows": len(table["ok"]),
            "rows_ok": sum(table["ok"]),
            "rows_failed": failed,
            "this_run": {"items_processed": result.items_processed, "items_per_second": result.items_per_second,
                         "shards_reused": result.shards_reused, "num_shards": result.num_shards},
        }
        write_json(OUT_DIR / "summary.json", summary)
        log.info("captions: %d ok, failed %s", summary["rows_ok"], failed)
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
