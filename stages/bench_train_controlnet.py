"""Stage bench_train_controlnet: training steps/s and peak memory with and without mixed precision and
gradient checkpointing.

Runs the train_controlnet loop (every setting from the ``train_controlnet`` section but the resolution, batch
size, mixed precision and gradient checkpointing, which come from this section) for each pair of
``mixed_precision`` x ``gradient_checkpointing``: ``warmup_steps`` untimed optimizer steps, then
``timed_steps`` timed ones, each configuration in a fresh process, one after the other in the same run; no
checkpoint, validation or model is written. Peak memory is CUDA's ``max_memory_allocated`` (and ``_reserved``)
on a GPU, the process's peak RSS on the CPU. Ratios are against fp32 without checkpointing. On the CPU fp16
is replaced by bf16 (accelerate autocasts no fp16 on the CPU: the loop would fail). A configuration that
runs out of GPU memory is recorded as ``{"error": "out of memory"}``.

Reads data/models/sd_base (``train_controlnet.pretrained_model``) and data/datasets/facesynthetics_spiga;
writes reports/bench/train_controlnet.json (speed, memory, ratios) and its .provenance.json (the rest).
"""
from __future__ import annotations

import logging
import os
import platform
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from pipelines.errors import PipelineError
from pipelines.reports import provenance, read_model_manifest, split_report, write_report
from pipelines.training.bench import BASELINE, config_name, run_matrix
from stages.config import cli, load, read_params, run, training_device
from stages.schemas.bench_train import BenchTrainConfig
from stages.schemas.train_controlnet import PROMPTS_KEY, TrainControlNetConfig

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "base.seed", "base.device", "bench_train_controlnet", "train_controlnet", PROMPTS_KEY)
DATASET_DIR = Path("data/datasets/facesynthetics_spiga")

REPORT = Path("reports/bench/train_controlnet.json")
STANDIN_WARNING = "stand-in tiny UNet: speed says nothing about SD 2.1-base"
CPU_NOTE = "CPU; peak memory is process RSS (imported libraries included: see rss_at_start_gib)"
log = logging.getLogger("stages.bench_train_controlnet")


def main(argv: list[str] | None = None) -> dict:
    """Measure every configuration and write the report; returns it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = cli(__doc__, argv)
    params = read_params(args.params, PARAMS)
    base, cfg = load(BenchTrainConfig, "bench_train_controlnet", params, args.profile)
    _, train = load(TrainControlNetConfig, "train_controlnet", params, args.profile)
    on_cpu = training_device(base.device, "bench_train_controlnet").type == "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PipelineError("bench_train_controlnet measures one process per configuration: start it with python, "
                            "not accelerate launch or torchrun")
    sd_dir = Path(train.pretrained_model)
    sd_info = read_model_manifest(sd_dir)
    if not (DATASET_DIR / "data").is_dir():
        raise FileNotFoundError(f"{DATASET_DIR} holds no dataset (no data/ folder): run the assemble stage first")
    notes = [STANDIN_WARNING] if sd_info.standin else []
    precisions = list(cfg.mixed_precision)
    if on_cpu:
        notes.append(CPU_NOTE)
        if "fp16" in precisions:
            precisions = list(dict.fromkeys("bf16" if p == "fp16" else p for p in precisions))
            notes.append("fp16 replaced by bf16 on the CPU (accelerate autocasts no fp16 there; bf16 is the CPU half type)")
    settings = replace(train.settings(base.seed), resolution=cfg.resolution, train_batch_size=cfg.train_batch_size)
    with tempfile.TemporaryDirectory(prefix="bench_train_controlnet_") as tmp:
        measured = run_matrix(settings, sd_dir, DATASET_DIR, tmp, mixed_precision=precisions,
                              gradient_checkpointing=cfg.gradient_checkpointing, warmup_steps=cfg.warmup_steps,
                              timed_steps=cfg.timed_steps, cpu=on_cpu)
    done = [r for r in measured["configs"].values() if "error" not in r]
    device = done[0]["device"] if done else ("cpu" if on_cpu else "cuda")
    gpu_names = [r["device_name"] for r in done if "device_name" in r]
    report = {
        **measured,
        "baseline": config_name(*BASELINE),
        "device": device,
        "device_name": gpu_names[0] if gpu_names else platform.processor() or platform.machine(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "mixed_precision_tried": precisions,
        "method": "train_controlnet's loop, one fresh process per configuration, run one after the other; "
                  "steps/s over the timed optimizer steps after the warm-up ones (device synchronized before each "
                  "timestamp); images/s = steps/s x batch x gradient accumulation; peak memory over the whole run",
        "notes": notes,
        "uses_standin_models": sd_info.standin,
        **provenance([sd_info], {"device": device, "num_processes": 1},
                     {"bench_train_controlnet": asdict(cfg), "train_controlnet": asdict(train)}),
    }
    # metrics: each configuration's speed, memory and last loss, and the ratios; the rest (per-step seconds,
    # dtypes, memory kind, machine, notes, models, params) goes to the .provenance.json
    write_report(REPORT, *split_report(report, [
        f"configs.{name}.{k}" for name, r in measured["configs"].items()
        for k in ("steps_per_second", "images_per_second", "peak_memory_gib", "final_loss") if k in r
    ] + ["ratios", "uses_standin_models"]))
    for name, r in measured["configs"].items():
        if "error" in r:
            log.info("%-20s %s", name, r["error"])
            continue
        ratio = {k: "n/a" if v is None else f"x{v:.2f}" for k, v in measured["ratios"][name].items()}
        log.info("%-20s %.3f steps/s (%.2f img/s, %s), peak %.3f GiB (%s)", name, r["steps_per_second"],
                 r["images_per_second"], ratio["speed"], r["peak_memory_gib"], ratio["memory"])
    log.info("bench_train_controlnet: report in %s%s", REPORT, "".join(f"; {n}" for n in notes))
    return report


if __name__ == "__main__":
    run(main)
