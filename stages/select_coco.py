"""Stage select_coco: which COCO 2017 images are "covered substantially by humans".

Reads data/raw/coco/annotations/person_keypoints_{split}2017.json (every person annotation of COCO, with
segmentation and keypoints, and every image of the split) and applies the rule of pipelines.coco_humans
(every threshold a key of the ``select_coco`` section). Writes data/interim/coco_humans/selection.json: per
split the kept image ids, the count each rule removed (in rule order), and the malformed annotation ids.
"""
from __future__ import annotations

from pathlib import Path

from pipelines.coco_humans import RULES, select_images
from pipelines.reports import write_json
from pipelines.sources import coco as S
from stages import config as C
from stages.schemas.select_coco import SelectCocoConfig

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("select_coco",)

ROOT = Path("data/raw/coco")
OUT = Path("data/interim/coco_humans/selection.json")


def select(cfg: SelectCocoConfig, root: Path = ROOT, out: Path = OUT) -> dict:
    """Run the rule on both splits and write the selection; return it."""
    rule = cfg.rule()
    splits = {}
    for split in S.SPLITS:
        coco = S.load_coco(S.annotation_path(root, "person_keypoints", split))
        result = select_images(coco, rule)  # no wall time here: a data output (bench_coco_select times it)
        result["removed_in_order"] = [{"rule": r, "removed": result["removed"][r]} for r in RULES]  # JSON keys get sorted
        result["stats"] = {str(k): v for k, v in result["stats"].items()}
        splits[split] = result
    selection = {"rule": rule.to_dict(), "rule_order": list(RULES), "splits": splits}
    write_json(out, selection)
    return selection


def main(argv: list[str] | None = None) -> None:
    """Run the stage (``argv``: the command line, for tests)."""
    args = C.cli(__doc__, argv)
    _, cfg = C.load(SelectCocoConfig, "select_coco", C.read_params(args.params, PARAMS), args.profile)
    selection = select(cfg)
    for split, r in selection["splits"].items():
        print(f"select_coco {split}: kept {r['kept']} of {r['num_images']}; removed {r['removed']}")


if __name__ == "__main__":
    C.run(main)
