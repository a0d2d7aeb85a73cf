"""The head-pose direction thresholds: read by headpose_facesynthetics and headpose_photos."""
from __future__ import annotations

from dataclasses import dataclass

from stages import config as C


@dataclass(frozen=True)
class DirectionThresholds:
    """Degrees past which a face is labelled left/right (yaw) or up/down (pitch)."""

    yaw: float
    pitch: float

    def validate(self, prefix: str) -> None:
        """Both must be > 0."""
        C.positive(prefix, yaw=self.yaw, pitch=self.pitch)
