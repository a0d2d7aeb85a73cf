"""Where and how a long job runs: device, precision, seeding, and the split of work across processes.

One mechanism for every stage (annotate, caption, generate, evaluate). When a stage is started by
``accelerate launch`` the process index and count come from ``accelerate``; otherwise it is one process.
"""
from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.devices import DEVICES, resolve_device  # noqa: F401  (the runtime's device vocabulary and resolver)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Runtime:
    """The resolved execution context of one process."""

    device: torch.device
    precision: str  # fp32 | fp16 | bf16: the autocast dtype for model forwards
    process_index: int = 0
    num_processes: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the chosen precision on this device; a no-op in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def wait_for_everyone(self) -> None:
        """Barrier across processes (no-op for one process)."""
        if self.num_processes > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def describe(self) -> dict:
        """A JSON-able summary for reports."""
        info = {
            "device": str(self.device),
            "precision": self.precision,
            "num_processes": self.num_processes,
            "torch": torch.__version__,
        }
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
        return info


def resolve_precision(name: str, device: torch.device, auto: str = "fp16") -> str:
    """``auto`` gives ``auto`` (fp16 or bf16, caller's choice) on CUDA and fp32 elsewhere.

    Half precision on CPU is slower than fp32 and on MPS unreliable, so ``auto`` keeps fp32 there.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        if auto == "bf16" and not torch.cuda.is_bf16_supported():
            return "fp16"
        return auto
    return name


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def init_runtime(device: str = "auto", precision: str = "auto", seed: int = 0, auto_precision: str = "fp16") -> Runtime:
    """Resolve device, precision and the process split; seed everything; enable TF32 on CUDA."""
    process_index, num_processes, local_index = 0, 1, 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by accelerate / torchrun
        from accelerate import PartialState

        # accelerate only forms a CPU process group (gloo) when told the run is on CPU
        on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        state = PartialState(cpu=on_cpu)
        process_index, num_processes, local_index = state.process_index, state.num_processes, state.local_process_index
    dev = resolve_device(device, local_index)
    prec = resolve_precision(precision, dev, auto=auto_precision)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    seed_everything(seed + process_index)
    return Runtime(device=dev, precision=prec, process_index=process_index, num_processes=num_processes)


@contextlib.contextmanager
def inference_mode() -> Iterator[None]:
    """``torch.inference_mode`` as a plain context manager."""
    with torch.inference_mode():
        yield


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA) so wall-clock timings are true; a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
