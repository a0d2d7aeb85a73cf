"""Stage generate: sample an image per validation condition of the dataset, with fixed seeds, for evaluation.

Reads data/datasets/facesynthetics_spiga (split ``validation``: its (conditioning_image, text) pairs, sorted
by id, the first ``max_images``), data/models/sd_base and data/models/controlnet (Stable Diffusion
2.1-base + multimodalart/uncannyfaces_25K in the real profile; tiny random-weight stand-ins in the sample
profile, whose images mean nothing). Writes data/generated/<model_name>/ (images/{id}.png, metadata.jsonl
with id, prompt, seed and file_name in id order, summary.json), the fixed-seed sample grid
reports/plots/samples/<model_name>.png (rows of condition | generated) and reports/bench/generate.json
(images/s at batch_size vs batch 1). The seed of each image comes from its id and base.seed only, so
images do not depend on the batch size or the process split. The output folder is emptied first: the
stage is cheap to rerun per model. Several GPUs: `accelerate launch -m stages.generate` splits the ids.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from tqdm.auto import tqdm

from pipelines.generation import (
    generate_images,
    load_conditions,
    load_controlnet_pipeline,
    sample_grid,
    seed_for,
)
from pipelines.reports import provenance, read_model_manifest, write_json
from pipelines.runtime import Runtime, init_runtime, synchronize
from pipelines.standins import STANDIN_NOTE
from stages.config import ParamError, cli, load, positive, read_params, run

DATASET_DIR = Path("data/datasets/facesynthetics_spiga")
SPLIT = "validation"
SD_DIR = Path("data/models/sd_base")
CONTROLNET_DIR = Path("data/models/controlnet")
OUT_ROOT = Path("data/generated")
GRID_DIR = Path("reports/plots/samples")
BENCH_FILE = Path("reports/bench/generate.json")
GRID_CELL_MAX = 256  # grid cells are min(resolution, this) px, to keep the PNG in git small
log = logging.getLogger("stages.generate")


@dataclass(frozen=True)
class GenerateConfig:
    """The ``generate`` section of params.yaml."""

    model_name: str
    scheduler: Literal["unipc", "ddim", "euler", "dpm"]
    guidance_scale: float
    controlnet_conditioning_scale: float
    negative_prompt: str
    precision: Literal["auto", "fp32", "fp16", "bf16"]
    grid_size: int
    resolution: int
    num_inference_steps: int
    batch_size: int
    max_images: int | None

    def validate(self, prefix: str = "generate") -> None:
        """Reject values that cannot work."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.model_name):
            raise ParamError(f"{prefix}.model_name: {self.model_name!r} must be a plain folder name "
                             "(letters, digits, '.', '_', '-')")
        positive(prefix, grid_size=self.grid_size, resolution=self.resolution,
                 num_inference_steps=self.num_inference_steps, batch_size=self.batch_size)
        if self.resolution % 8:
            raise ParamError(f"{prefix}.resolution: must be a multiple of 8, got {self.resolution}")
        if self.max_images is not None and self.max_images <= 0:
            raise ParamError(f"{prefix}.max_images: must be > 0 or null, got {self.max_images!r}")
        for key in ("guidance_scale", "controlnet_conditioning_scale"):
            if getattr(self, key) < 0:
                raise ParamError(f"{prefix}.{key}: must be >= 0, got {getattr(self, key)!r}")


def _generate(pipe: Any, cfg: GenerateConfig, rows: dict, seeds: list[int]) -> list[Image.Image]:
    """Images for a batch of dataset rows (a dict of lists) and their seeds."""
    return generate_images(pipe, rows["conditioning_image"], rows["text"], seeds, cfg.resolution,
                           cfg.num_inference_steps, cfg.guidance_scale, cfg.controlnet_conditioning_scale,
                           cfg.negative_prompt)


def benchmark(pipe: Any, cfg: GenerateConfig, ds: Any, seeds: list[int], runtime: Runtime) -> dict:
    """images/s at ``cfg.batch_size`` and at batch 1 on the first min(2*batch_size, N) conditions, side by
    side with the same pipeline; one warm-up call before each."""
    n = min(2 * cfg.batch_size, len(ds))
    rows, seeds = ds[:n], seeds[:n]
    out: dict[str, Any] = {"images": n}
    for bs in dict.fromkeys((cfg.batch_size, 1)):
        _generate(pipe, cfg, {k: v[:bs] for k, v in rows.items()}, seeds[:bs])  # warm-up
        synchronize(runtime.device)
        t0 = time.perf_counter()
        for i in range(0, n, bs):
            _generate(pipe, cfg, {k: v[i:i + bs] for k, v in rows.items()}, seeds[i:i + bs])
        synchronize(runtime.device)
        dt = time.perf_counter() - t0
        out[f"batch_{bs}"] = {"batch_size": bs, "seconds": dt, "images_per_second": n / dt if dt > 0 else None}
    top, one = out[f"batch_{cfg.batch_size}"]["images_per_second"], out["batch_1"]["images_per_second"]
    out["speedup_vs_batch_1"] = top / one if top and one else None
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the stage; returns the summary written to ``summary.json`` (empty on non-main processes)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = cli(__doc__, argv)
    base, cfg = load(GenerateConfig, "generate", read_params(args.params), args.profile)
    runtime = init_runtime(base.device, cfg.precision, base.seed)
    models = [read_model_manifest(SD_DIR), read_model_manifest(CONTROLNET_DIR)]
    standin = any(m.standin for m in models)
    ds = load_conditions(DATASET_DIR, SPLIT)
    count = len(ds) if cfg.max_images is None else min(cfg.max_images, len(ds))
    if count == 0:
        raise FileNotFoundError(f"{DATASET_DIR} has no {SPLIT!r} rows to generate from")
    ids: list[str] = list(ds["id"])
    seeds = [seed_for(i, base.seed) for i in ids]

    out_dir = OUT_ROOT / cfg.model_name
    images_dir = out_dir / "images"
    if runtime.is_main_process:
        shutil.rmtree(out_dir, ignore_errors=True)
        images_dir.mkdir(parents=True)
    runtime.wait_for_everyone()

    pipe = load_controlnet_pipeline(SD_DIR, CONTROLNET_DIR, cfg.scheduler, runtime.device, runtime.precision)
    mine = list(range(runtime.process_index, count, runtime.num_processes))
    batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    synchronize(runtime.device)
    t0 = time.perf_counter()
    for idx in tqdm(batches, desc="generate", unit="batch", disable=not runtime.is_main_process):
        rows = ds[idx]
        for sid, image in zip(rows["id"], _generate(pipe, cfg, rows, [seeds[i] for i in idx]), strict=True):
            image.save(images_dir / f"{sid}.png")
    synchronize(runtime.device)
    seconds = time.perf_counter() - t0
    runtime.wait_for_everyone()
    if not runtime.is_main_process:
        return {}

    prompts: list[str] = list(ds["text"])  # the column alone: no image decoding
    with open(out_dir / "metadata.jsonl", "w") as fh:
        for i in range(count):
            fh.write(json.dumps({"file_name": f"images/{ids[i]}.png", "id": ids[i], "prompt": prompts[i],
                                 "seed": seeds[i]}, sort_keys=True) + "\n")

    # the grid: the first grid_size conditions (the images made above, or made now with the same seeds)
    g = min(cfg.grid_size, len(ds))
    grid_rows = ds[:g]
    made = [Image.open(images_dir / f"{i}.png").convert("RGB") for i in grid_rows["id"][:count]]
    if g > len(made):
        rest = {k: v[len(made):] for k, v in grid_rows.items()}
        made += _generate(pipe, cfg, rest, seeds[len(made):g])
    grid = sample_grid(grid_rows["conditioning_image"], made, g, min(cfg.resolution, GRID_CELL_MAX))
    GRID_DIR.mkdir(parents=True, exist_ok=True)
    grid_path = GRID_DIR / f"{cfg.model_name}.png"
    grid.save(grid_path)

    note = (f"STAND-IN models ({STANDIN_NOTE}); on {runtime.device.type} at {cfg.resolution} px their speed "
            "says nothing of SD 2.1-base's") if standin else ""
    prov = provenance(models, runtime.describe(), asdict(cfg))
    bench = {"model_name": cfg.model_name, "device": str(runtime.device), "precision": runtime.precision,
             "resolution": cfg.resolution, "num_inference_steps": cfg.num_inference_steps, "scheduler": cfg.scheduler,
             "note": note, **benchmark(pipe, cfg, ds.select(range(count)), seeds, runtime), **prov}
    write_json(BENCH_FILE, bench)

    summary = {"model_name": cfg.model_name, "dataset": str(DATASET_DIR), "split": SPLIT, "count": count,
               "seconds": seconds, "images_per_second": len(mine) / seconds if seconds > 0 else None,
               "num_processes": runtime.num_processes, "grid": str(grid_path), "base_seed": base.seed,
               "note": note, **prov}
    write_json(out_dir / "summary.json", summary)
    log.info("generate: %d images in %s (%.2f images/s on the main process)%s", count, out_dir,
             summary["images_per_second"] or 0.0, f" ({note})" if note else "")
    return summary


if __name__ == "__main__":
    run(main)
