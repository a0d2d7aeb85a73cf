"""The training-benchmark matrix (mixed precision x gradient checkpointing): read by bench_train_controlnet (its
section) and by the GPU check (``gpu_check.train``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipelines.training.bench import BASELINE
from stages.config import ParamError, positive


@dataclass(frozen=True)
class BenchTrainConfig:
    """A training-speed matrix: ``mixed_precision`` x ``gradient_checkpointing``, which must hold the baseline of
    the ratios (fp32, false)."""

    resolution: int
    train_batch_size: int  # per process (the bench runs one process)
    warmup_steps: int  # untimed optimizer steps first (allocation, autotuning)
    timed_steps: int
    mixed_precision: list[Literal["fp32", "fp16", "bf16"]]
    gradient_checkpointing: list[bool] = field(default_factory=lambda: [False, True])

    def validate(self, prefix: str = "bench_train_controlnet") -> None:
        """Reject values that cannot work, naming the key."""
        positive(prefix, resolution=self.resolution, train_batch_size=self.train_batch_size,
                 warmup_steps=self.warmup_steps, timed_steps=self.timed_steps)
        if self.resolution % 8:
            raise ParamError(f"{prefix}.resolution: must be a multiple of 8, got {self.resolution}")
        for key, baseline in zip(("mixed_precision", "gradient_checkpointing"), BASELINE, strict=True):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ParamError(f"{prefix}.{key}: repeated values in {values!r}")
            if baseline not in values:
                raise ParamError(f"{prefix}.{key}: must include {baseline!r} (the baseline of the ratios), got {values!r}")
