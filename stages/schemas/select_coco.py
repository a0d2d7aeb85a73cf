"""The ``select_coco`` section (the COCO humans rule): read by select_coco and bench_coco_select."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from pipelines.coco_humans import SelectionRule
from stages import config as C


@dataclass(frozen=True)
class SelectCocoConfig:
    """The ``select_coco`` section of params.yaml: the rule's thresholds."""

    min_side: int  # px: min(width, height) at least this
    max_persons: int  # non-crowd persons at most this
    allow_crowd: bool  # False: an image with an iscrowd=1 person annotation is removed
    min_face_keypoints: int  # of nose, eyes, ears (0-5) on one person, to count as a visible face
    face_visibility: int  # 2: visible only; 1: labelled though occluded too
    min_largest_person_fraction: float  # the largest person's mask area / image area at least this
    min_person_area_fraction: float  # the union of person masks / image area at least this

    def validate(self, prefix: str) -> None:
        """Raise :class:`stages.config.ParamError` naming the first bad value."""
        C.positive(prefix, min_side=self.min_side, max_persons=self.max_persons)
        if not 0 <= self.min_face_keypoints <= 5:
            raise C.ParamError(f"{prefix}.min_face_keypoints: must be in 0..5, got {self.min_face_keypoints}")
        if self.face_visibility not in (1, 2):
            raise C.ParamError(f"{prefix}.face_visibility: is not one of 1, 2 (got {self.face_visibility!r})")
        for name in ("min_largest_person_fraction", "min_person_area_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise C.ParamError(f"{prefix}.{name}: must be in [0, 1], got {getattr(self, name)!r}")

    def rule(self) -> SelectionRule:
        return SelectionRule(**asdict(self))
