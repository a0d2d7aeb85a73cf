"""The ``annotate`` section: read by annotate, bench_facesynthetics (and ``box_margin`` by evaluate)."""
from __future__ import annotations

from dataclasses import dataclass

from stages import config as C


@dataclass(frozen=True)
class AnnotateConfig:
    """The ``annotate`` section of params.yaml."""

    box_margin: float  # px added on every side of the landmarks' min/max box
    min_box_inside: float  # skip a face whose box has less than this share of its area inside the image
    precision: C.Precision
    batch_size: int
    num_workers: int
    shard_size: int

    def validate(self, prefix: str) -> None:
        """Reject values that cannot work, naming the key."""
        C.positive(prefix, batch_size=self.batch_size, shard_size=self.shard_size)
        if self.num_workers < 0:
            raise C.ParamError(f"{prefix}.num_workers: must be >= 0, got {self.num_workers!r}")
        if self.box_margin < 0:
            raise C.ParamError(f"{prefix}.box_margin: must be >= 0, got {self.box_margin!r}")
        if not 0 < self.min_box_inside <= 1:
            raise C.ParamError(f"{prefix}.min_box_inside: must be in (0, 1], got {self.min_box_inside!r}")
