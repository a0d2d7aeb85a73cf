"""Training speed and peak memory of the ControlNet loop, per mixed-precision / gradient-checkpointing setting.

:func:`measure_training` runs :func:`~pipelines.training.controlnet.train_controlnet` for ``warmup_steps``
untimed plus ``timed_steps`` timed optimizer steps (no checkpoint, no validation, no saved model) and times
the timed steps through its ``on_step`` hook, after synchronizing the device. :func:`run_matrix` runs it once
per configuration, each in a fresh spawned process, so that nothing carries over between configurations:
not the peak memory (a process's peak RSS cannot be reset), nor CUDA's allocator cache or autotuning.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipelines.runtime import synchronize

if TYPE_CHECKING:  # the trainer (diffusers, datasets) is imported where a measurement runs, not with BASELINE
    from pipelines.training.controlnet import TrainSettings

log = logging.getLogger("pipelines.training.bench")
GIB = 1024 ** 3
BASELINE = ("fp32", False)  # (mixed_precision, gradient_checkpointing) the ratios are taken against


def measure_training(settings: TrainSettings, pretrained_dir: str | Path, dataset_dir: str | Path,
                     work_dir: str | Path, *, warmup_steps: int, timed_steps: int, cpu: bool,
                     cache_dir: str | Path | None = None) -> dict:
    """Steps/s over ``timed_steps`` optimizer steps after ``warmup_steps`` untimed ones, and peak memory.

    Everything the run writes (logs, a datasets cache unless ``cache_dir``) goes under ``work_dir``. Peak
    memory covers the whole run (model loading included): on CUDA ``max_memory_allocated`` (and
    ``_reserved``) of this process, elsewhere the process's peak RSS (``rss_at_start_gib``: what the process
    held before, imported libraries included), so call it in a fresh process. ``step_seconds`` lists the
    timed steps one by one (an outlier there is another program's doing on a shared machine).
    """
    from pipelines.training.controlnet import train_controlnet

    if warmup_steps < 1 or timed_steps < 1:
        raise ValueError(f"warmup_steps and timed_steps must be >= 1, got {warmup_steps} and {timed_steps}")
    total = warmup_steps + timed_steps
    # one step more than is run, stopped at `total`: the run ends "interrupted", so no final model is saved
    s = dataclasses.replace(settings, max_train_steps=total + 1, checkpointing_steps=total + 1,
                            validation_steps=total + 1, num_validation_images=0)
    work = Path(work_dir)
    rss_at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    on_cuda = not cpu and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    stamps: dict[int, float] = {}

    def stamp(step: int, model: Any) -> None:
        synchronize(next(model.parameters()).device)
        stamps[step] = time.perf_counter()

    summary = train_controlnet(s, pretrained_dir, dataset_dir, work / "out", work / "checkpoints", work / "logs",
                               cpu=cpu, cache_dir=work / "hf_cache" if cache_dir is None else cache_dir,
                               stop_after=total, on_step=stamp)
    seconds = stamps[total] - stamps[warmup_steps]
    step_seconds = [stamps[k + 1] - stamps[k] for k in range(warmup_steps, total)]
    steps_per_second = timed_steps / seconds
    device = torch.device(summary["device"])
    out: dict[str, Any] = {
        "device": str(device), "mixed_precision": summary["mixed_precision"],
        "gradient_checkpointing": s.gradient_checkpointing, "resolution": s.resolution,
        "train_batch_size": s.train_batch_size, "gradient_accumulation_steps": s.gradient_accumulation_steps,
        "warmup_steps": warmup_steps, "timed_steps": timed_steps, "seconds": seconds, "step_seconds": step_seconds,
        "steps_per_second": steps_per_second,
        "images_per_second": steps_per_second * s.train_batch_size * s.gradient_accumulation_steps,
        "controlnet_dtype": summary["controlnet_dtype"], "frozen_dtype": summary["frozen_dtype"],
        "final_loss": summary["final_loss"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "rss_at_start_gib": rss_at_start / GIB,
    }
    if device.type == "cuda":
        out.update(peak_memory_gib=torch.cuda.max_memory_allocated(device) / GIB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB,
                   peak_memory_kind="cuda max_memory_allocated", device_name=torch.cuda.get_device_name(device))
    else:
        out.update(peak_memory_gib=out["peak_rss_gib"], peak_memory_kind="process peak RSS")
    return out


def _measure_or_oom(settings: TrainSettings, *args: Any, **kwargs: Any) -> dict:
    """:func:`measure_training` in the child process; running out of GPU memory becomes an error record
    (``torch.OutOfMemoryError``, or a CUDA library's "out of memory" ``RuntimeError``)."""
    try:
        return measure_training(settings, *args, **kwargs)
    except RuntimeError as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc):
            raise
        return {"error": "out of memory", "mixed_precision": settings.mixed_precision,
                "gradient_checkpointing": settings.gradient_checkpointing}


def config_name(mixed_precision: str, gradient_checkpointing: bool) -> str:
    """The report key of one configuration, e.g. ``bf16+checkpointing`` or ``fp32``."""
    return f"{mixed_precision}{'+checkpointing' if gradient_checkpointing else ''}"


def run_matrix(settings: TrainSettings, pretrained_dir: str | Path, dataset_dir: str | Path, work_dir: str | Path, *,
               mixed_precision: Sequence[str], gradient_checkpointing: Sequence[bool], warmup_steps: int,
               timed_steps: int, cpu: bool) -> dict:
    """:func:`measure_training` for every (mixed precision, checkpointing) pair, each in a fresh spawned
    process, one after the other; plus each one's speed and memory ratio to fp32 without checkpointing.

    Returns ``{"configs": {name: result}, "ratios": {name: {"speed", "memory"}}}`` (names from
    :func:`config_name`). A configuration that runs out of GPU memory is recorded as ``{"error": "out of
    memory"}``; its ratios (and all ratios, when it is the baseline) are None. Any other failure is raised.
    """
    work = Path(work_dir)
    configs: dict[str, dict] = {}
    for prec, gc in itertools.product(mixed_precision, gradient_checkpointing):
        name = config_name(prec, gc)
        log.info("bench_train_controlnet: %s (%d warm-up + %d timed steps)", name, warmup_steps, timed_steps)
        s = dataclasses.replace(settings, mixed_precision=prec, gradient_checkpointing=gc)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            result = pool.submit(_measure_or_oom, s, pretrained_dir, dataset_dir, work / name,
                                 warmup_steps=warmup_steps, timed_steps=timed_steps, cpu=cpu,
                                 cache_dir=work / "hf_cache").result()
        if "error" in result:
            log.warning("bench_train_controlnet: %s failed: %s", name, result["error"])
        else:
            log.info("bench_train_controlnet: %s: %.3f steps/s, peak %.3f GiB (%s)", name, result["steps_per_second"],
                     result["peak_memory_gib"], result["peak_memory_kind"])
        configs[name] = result
    return {"configs": configs, "ratios": ratios_to_baseline(configs)}


def ratios_to_baseline(configs: dict[str, dict]) -> dict[str, dict]:
    """Each configuration's steps/s and peak memory divided by the baseline's (fp32, no checkpointing); None
    where either failed or the baseline is absent."""
    base = configs.get(config_name(*BASELINE), {"error": "not measured"})
    ratios = {}
    for name, r in configs.items():
        ok = "error" not in r and "error" not in base
        ratios[name] = {"speed": r["steps_per_second"] / base["steps_per_second"] if ok else None,
                        "memory": r["peak_memory_gib"] / base["peak_memory_gib"] if ok else None}
    return ratios
