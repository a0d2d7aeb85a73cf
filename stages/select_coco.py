"""Stage select_coco: which COCO 2017 images are "covered substantially by humans".

Reads data/raw/coco/annotations/person_keypoints_{split}2017.json (every person annotation of COCO, with
segmentation and keypoints, and every image of the split) and applies the rule of pipelines.coco_humans
(every threshold a key of the ``select_coco`` section). Writes data/interim/coco_humans/selection.json: per
split the kept image ids, the count each rule removed (in rule order), and the malformed annotation ids.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.coco_humans import RULES, SelectionRule, select_images
from pipelines.reports import write_json
from pipelines.sources import coco as S
from stages import config as C

ROOT = Path("data/raw/coco")
OUT = Path("data/interim/coco_humans/selection.json")


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


def select(cfg: SelectCocoConfig, root: Path = ROOT, out: Path = OUT) -> dict:
    """Run the rule on both splits and write the selection; return it."""
    rule = cfg.rule()
    splits = {}
    for split in S.SPLITS:
        start = time.perf_counter()
        coco = S.load_coco(S.annotation_path(root, "person_keypoints", split))
        result = select_images(coco, rule)
        result["seconds"] = time.perf_counter() - start
        result["removed_in_order"] = [{"rule": r, "removed": result["removed"][r]} for r in RULES]  # JSON keys get sorted
        result["stats"] = {str(k): v for k, v in result["stats"].items()}
        splits[split] = result
    selection = {"rule": rule.to_dict(), "rule_order": list(RULES), "splits": splits}
    write_json(out, selection)
    return selection


def main(argv: list[str] | None = None) -> None:
    """Run the stage (``argv``: the command line, for tests)."""
    args = C.cli(__doc__, argv)
    _, cfg = C.load(SelectCocoConfig, "select_coco", C.read_params(args.params), args.profile)
    selection = select(cfg)
    for split, r in selection["splits"].items():
        print(f"select_coco {split}: kept {r['kept']} of {r['num_images']}; removed {r['removed']}")


if __name__ == "__main__":
    C.run(main)
