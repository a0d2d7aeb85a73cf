"""Stage generate: sample images from one ControlNet for evaluation, with fixed seeds (one DVC stage per model).

``python -m stages.generate --model NAME --controlnet FOLDER``; ``controlnets`` in params.yaml maps each model name
to its ControlNet folder, and dvc.yaml runs this stage once per entry (``generate@NAME``): the released
multimodalart/uncannyfaces_25K (data/models/controlnet) and ours (models/controlnet_landmarks, from the
train_controlnet stage), so both are generated and evaluated the same way.

Reads data/datasets/facesynthetics_spiga (split ``validation``: its (conditioning_image, text) pairs, sorted
by id, the first ``max_images``), data/models/sd_base and the model's ControlNet (tiny random-weight
stand-ins in the sample profile, whose images mean nothing). Writes data/generated/<model>/:

* images/{id}.png + metadata.jsonl (id, prompt, seed, file_name in id order): one image per condition
  with its own caption (FID/KID/IS/CLIP and control fidelity are measured on these);
* off_distribution/{j}_{id}.png + off_distribution.jsonl: every prompt of the fixed list
  ``off_distribution_prompts`` (a cat, a car, a painting...) drawn on the first ``off_distribution_conditions``
  conditions with the condition's own seed. An overfit ControlNet draws a face whatever the prompt; the
  evaluate stage turns that into a number (prompt adherence);
* summary.json; and the grids reports/plots/samples/<model>.png (condition | generated, the first
  ``grid_size`` conditions) and <model>_off_distribution.png (one row per off-distribution prompt),
  reports/bench/generate_<model>.json (images/s at batch_size vs batch 1, and of the whole run on the main
  process; the summary, a data output, holds no timings) with its .provenance.json.

Images come from our own denoising loop (:func:`pipelines.sampling.sample`, the diffusers pipeline's images at the
same seeds, tested) over the loaded pipeline's parts. The seed of each image comes from its condition id and base.seed only, so images do not depend on the
batch size or the process split. The output folder is emptied first: the stage is cheap to rerun per
model. Several GPUs: `accelerate launch -m stages.generate --model NAME` splits the images.
"""
from __future__ import annotations

import argparse
import logging
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from tqdm.auto import tqdm

from pipelines.generation import (
    METADATA,
    OFF_DISTRIBUTION_METADATA,
    GenerationJob,
    condition_jobs,
    generate_images,
    load_conditions,
    load_controlnet_pipeline,
    off_distribution_jobs,
    sample_grid,
    write_jobs,
)
from pipelines.reports import provenance, read_model_manifest, split_report, write_json, write_report
from pipelines.runtime import Runtime, init_runtime, synchronize
from pipelines.standins import STANDIN_NOTE
from stages.config import ParamError, Precision, cli, load, model_argument, positive, read_params, run

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py); the model comes from the command
PARAMS = ("base.profile", "base.seed", "base.device", "generate")

DATASET_DIR = Path("data/datasets/facesynthetics_spiga")
SPLIT = "validation"
SD_DIR = Path("data/models/sd_base")
OUT_ROOT = Path("data/generated")
GRID_DIR = Path("reports/plots/samples")
BENCH_DIR = Path("reports/bench")
GRID_CELL_MAX = 256  # grid cells are min(resolution, this) px, to keep the PNG in git small
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
log = logging.getLogger("stages.generate")


def bench_path(model: str) -> Path:
    """Where the generation benchmark of ``model`` goes."""
    return BENCH_DIR / f"generate_{model}.json"


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model NAME --controlnet FOLDER`` (dvc.yaml passes an entry of ``controlnets``)."""
    model_argument(parser)
    parser.add_argument("--controlnet", required=True, type=Path, metavar="FOLDER",
                        help="the model's ControlNet folder (diffusers format with a facecontrol manifest)")


@dataclass(frozen=True)
class GenerateConfig:
    """The ``generate`` section of params.yaml."""

    scheduler: Literal["unipc", "ddim", "euler", "dpm"]
    guidance_scale: float
    controlnet_conditioning_scale: float
    negative_prompt: str
    precision: Precision
    grid_size: int
    off_distribution_prompts: list[str]
    off_distribution_conditions: int
    resolution: int
    num_inference_steps: int
    batch_size: int
    max_images: int | None

    def validate(self, prefix: str = "generate") -> None:
        """Reject values that cannot work."""
        positive(prefix, grid_size=self.grid_size, resolution=self.resolution,
                 num_inference_steps=self.num_inference_steps, batch_size=self.batch_size,
                 off_distribution_conditions=self.off_distribution_conditions)
        if not self.off_distribution_prompts or not all(p.strip() for p in self.off_distribution_prompts):
            raise ParamError(f"{prefix}.off_distribution_prompts: give a non-empty list of non-empty prompts")
        if len(set(self.off_distribution_prompts)) != len(self.off_distribution_prompts):
            raise ParamError(f"{prefix}.off_distribution_prompts: prompts must be distinct")
        if self.resolution % 8:
            raise ParamError(f"{prefix}.resolution: must be a multiple of 8, got {self.resolution}")
        if self.max_images is not None and self.max_images <= 0:
            raise ParamError(f"{prefix}.max_images: must be > 0 or null, got {self.max_images!r}")
        for key in ("guidance_scale", "controlnet_conditioning_scale"):
            if getattr(self, key) < 0:
                raise ParamError(f"{prefix}.{key}: must be >= 0, got {getattr(self, key)!r}")



def _generate(pipe: Any, cfg: GenerateConfig, ds: Any, jobs: Sequence[GenerationJob]) -> list[Image.Image]:
    """Images for a batch of jobs (their conditions read from the id-sorted split ``ds``)."""
    conditions = ds[[j.row for j in jobs]]["conditioning_image"]
    return generate_images(pipe, conditions, [j.prompt for j in jobs], [j.seed for j in jobs], cfg.resolution,
                           cfg.num_inference_steps, cfg.guidance_scale, cfg.controlnet_conditioning_scale,
                           cfg.negative_prompt)


def benchmark(pipe: Any, cfg: GenerateConfig, ds: Any, jobs: Sequence[GenerationJob], runtime: Runtime) -> dict:
    """images/s at ``cfg.batch_size`` and at batch 1 on the first min(2*batch_size, N) jobs, side by side
    with the same pipeline; one warm-up call before each."""
    n = min(2 * cfg.batch_size, len(jobs))
    jobs = jobs[:n]
    out: dict[str, Any] = {"images": n}
    for bs in dict.fromkeys((cfg.batch_size, 1)):
        _generate(pipe, cfg, ds, jobs[:bs])  # warm-up
        synchronize(runtime.device)
        t0 = time.perf_counter()
        for i in range(0, n, bs):
            _generate(pipe, cfg, ds, jobs[i:i + bs])
        synchronize(runtime.device)
        dt = time.perf_counter() - t0
        out[f"batch_{bs}"] = {"batch_size": bs, "seconds": dt, "images_per_second": n / dt if dt > 0 else None}
    top, one = out[f"batch_{cfg.batch_size}"]["images_per_second"], out["batch_1"]["images_per_second"]
    out["speedup_vs_batch_1"] = top / one if top and one else None
    return out


def _grid(ds: Any, jobs: Sequence[GenerationJob], out_dir: Path, cell: int, labelled: bool = False) -> Image.Image:
    conditions = ds[[j.row for j in jobs]]["conditioning_image"]
    made = [Image.open(out_dir / j.file_name).convert("RGB") for j in jobs]
    return sample_grid(conditions, made, len(jobs), cell, [j.prompt for j in jobs] if labelled else None)


def main(argv: list[str] | None = None) -> dict:
    """Run the stage for ``--model``; returns the summary written to ``summary.json`` (empty on non-main
    processes)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = cli(__doc__, argv, model_arguments)
    base, cfg = load(GenerateConfig, "generate", read_params(args.params, PARAMS), args.profile)
    model, controlnet_dir = args.model, args.controlnet
    if not MODEL_NAME.fullmatch(model):
        raise ParamError(f"--model: {model!r} must be a plain folder name (letters, digits, '.', '_', '-')")
    runtime = init_runtime(base.device, cfg.precision, base.seed)
    models = [read_model_manifest(SD_DIR), read_model_manifest(controlnet_dir)]
    standin = any(m.standin for m in models)
    ds = load_conditions(DATASET_DIR, SPLIT)
    count = len(ds) if cfg.max_images is None else min(cfg.max_images, len(ds))
    if count == 0:
        raise FileNotFoundError(f"{DATASET_DIR} has no {SPLIT!r} rows to generate from")
    ids: list[str] = list(ds["id"])
    captions: list[str] = list(ds["text"])  # the column alone: no image decoding
    jobs = condition_jobs(ids[:count], captions[:count], base.seed)
    off_ids = ids[:min(cfg.off_distribution_conditions, count)]
    off_jobs = off_distribution_jobs(off_ids, cfg.off_distribution_prompts, base.seed)

    out_dir = OUT_ROOT / model
    if runtime.is_main_process:
        shutil.rmtree(out_dir, ignore_errors=True)
        for sub in ("images", "off_distribution"):
            (out_dir / sub).mkdir(parents=True)
    runtime.wait_for_everyone()

    pipe = load_controlnet_pipeline(SD_DIR, controlnet_dir, cfg.scheduler, runtime.device, runtime.precision)
    mine = (jobs + off_jobs)[runtime.process_index::runtime.num_processes]
    batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    synchronize(runtime.device)
    t0 = time.perf_counter()
    for batch in tqdm(batches, desc=f"generate {model}", unit="batch", disable=not runtime.is_main_process):
        for job, image in zip(batch, _generate(pipe, cfg, ds, batch), strict=True):
            image.save(out_dir / job.file_name)
    synchronize(runtime.device)
    seconds = time.perf_counter() - t0
    runtime.wait_for_everyone()
    if not runtime.is_main_process:
        return {}

    write_jobs(out_dir / METADATA, jobs)
    write_jobs(out_dir / OFF_DISTRIBUTION_METADATA, off_jobs)
    cell = min(cfg.resolution, GRID_CELL_MAX)
    GRID_DIR.mkdir(parents=True, exist_ok=True)
    grid_path = GRID_DIR / f"{model}.png"
    _grid(ds, jobs[:cfg.grid_size], out_dir, cell).save(grid_path)
    off_grid_path = GRID_DIR / f"{model}_off_distribution.png"
    _grid(ds, off_jobs[::len(off_ids)], out_dir, cell, labelled=True).save(off_grid_path)  # each prompt, 1st condition

    note = (f"STAND-IN models ({STANDIN_NOTE}); on {runtime.device.type} at {cfg.resolution} px their speed "
            "says nothing of SD 2.1-base's") if standin else ""
    prov = provenance(models, runtime.describe(), asdict(cfg))
    rate = len(mine) / seconds if seconds > 0 else None
    bench = {"model_name": model, "device": str(runtime.device), "precision": runtime.precision,
             "resolution": cfg.resolution, "num_inference_steps": cfg.num_inference_steps, "scheduler": cfg.scheduler,
             "note": note, **benchmark(pipe, cfg, ds, jobs, runtime), **prov,
             "generation": {"images": len(mine), "seconds": seconds, "images_per_second": rate}}  # main process
    write_report(bench_path(model), *split_report(bench, (
        "images", f"batch_{cfg.batch_size}", *(("batch_1",) if cfg.batch_size != 1 else ()), "speedup_vs_batch_1",
        "generation", "resolution", "num_inference_steps", "uses_standin_models")))

    made = len(jobs) + len(off_jobs)
    summary = {"model_name": model, "controlnet_dir": str(controlnet_dir), "dataset": str(DATASET_DIR),
               "split": SPLIT, "count": count,
               "off_distribution": {"prompts": len(cfg.off_distribution_prompts), "conditions": len(off_ids),
                                    "images": len(off_jobs), "grid": str(off_grid_path)},
               "images_made": made, "num_processes": runtime.num_processes, "grid": str(grid_path),
               "base_seed": base.seed, "note": note, **prov}
    write_json(out_dir / "summary.json", summary)  # data: no timings (they are in the bench report)
    log.info("generate %s: %d condition + %d off-distribution images in %s (%.2f images/s on the main process)%s",
             model, len(jobs), len(off_jobs), out_dir, rate or 0.0,
             f" ({note})" if note else "")
    return summary


if __name__ == "__main__":
    run(main)
