"""Device names and their resolution: ``auto | cpu | cuda | cuda:N | mps`` to a ``torch.device`` this machine has.

Its own small module because the params layer checks ``base.device`` for every stage before any work
(stages.config), and a download stage should not re-run because the runtime's process split changed.
"""
from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str, local_index: int = 0) -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a torch device, failing clearly when it is absent."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_index % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    base, _, index = name.partition(":")
    if base not in DEVICES or base == "auto" or (index and (base != "cuda" or not index.isdigit())):
        raise ValueError(f"device {name!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
    if base == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but torch sees no CUDA device")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} was asked for but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if base == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} was asked for but MPS is not available")
    if name == "cuda":
        return torch.device("cuda", local_index % torch.cuda.device_count())
    return torch.device(name)
