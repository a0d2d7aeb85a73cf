"""The ``caption`` section: read by caption and bench_facesynthetics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stages import config as C


@dataclass(frozen=True)
class CaptionConfig:
    """The ``caption`` section of params.yaml."""

    method: Literal["blip", "none"]
    precision: C.Precision
    batch_size: int
    num_workers: int
    shard_size: int

    def validate(self, prefix: str = "caption") -> None:
        """Reject sizes that cannot work."""
        C.positive(prefix, batch_size=self.batch_size, shard_size=self.shard_size)
        if self.num_workers < 0:
            raise C.ParamError(f"{prefix}.num_workers: must be >= 0, got {self.num_workers!r}")
