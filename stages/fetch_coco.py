"""Stages fetch_coco_annotations and fetch_coco_images: MS COCO 2017 into data/raw/coco/.

fetch_coco_annotations (``python -m stages.fetch_coco annotations``) writes data/raw/coco/annotations/
(instances, person_keypoints, captions for train and val) + SOURCE.json:
  sample profile (source: embedded): the COCO-format sample drawn by code (pipelines.sources.coco); no network.
  real profile (source: official): the official annotations zip (resumable, verified against the md5 pin, swapped
  in only once complete), or (source: local)
  a copy from ``local_dir/annotations/`` for users who already have COCO.
fetch_coco_images (``python -m stages.fetch_coco images``) runs after select_coco and writes only the selected
images to data/raw/coco/images/{split}2017/ + SOURCE.json: downloaded by coco_url (source: official), copied
from ``local_dir/{split}2017/`` (source: local), or drawn by code (source: embedded). Files already there that
decode are kept (the output is ``persist: true``: an interrupted download resumes); missing images are listed.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipelines.reports import read_json, write_json
from pipelines.sources import coco as S
from stages import config as C

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "base.seed", "fetch_coco")

ANNOTATIONS_ROOT = Path("data/raw/coco")  # annotations live in data/raw/coco/annotations
IMAGES_DIR = Path("data/raw/coco/images")
SELECTION = Path("data/interim/coco_humans/selection.json")
CACHE_DIR = Path("data/cache/downloads")


@dataclass(frozen=True)
class FetchCocoConfig:
    """The ``fetch_coco`` section of params.yaml (both fetch stages read it)."""

    source: Literal["embedded", "official", "local"]
    annotations_url: str | None = None  # official: the annotations_trainval2017 zip
    sha256: str | None = None  # official: sha256 pin of the zip
    md5: str | None = None  # official: md5 pin of the zip (what COCO's users publish); neither: size only
    local_dir: str | None = None  # local: a COCO root holding annotations/, train2017/, val2017/
    num_workers: int = 8  # parallel image downloads or copies

    def validate(self, prefix: str) -> None:
        """Raise :class:`stages.config.ParamError` for combinations that do not fit the source."""
        if self.num_workers < 1:
            raise C.ParamError(f"{prefix}.num_workers: must be >= 1, got {self.num_workers}")
        if self.source == "official":
            if not (self.annotations_url or "").startswith(("http://", "https://")):
                raise C.ParamError(f"{prefix}.annotations_url: source 'official' needs an http(s) URL")
        for key, digits in (("sha256", 64), ("md5", 32)):
            value = getattr(self, key)
            if value is not None and not re.fullmatch(f"[0-9a-fA-F]{{{digits}}}", value):
                raise C.ParamError(f"{prefix}.{key}: expected {digits} hex digits or null, got {value!r}")
        if self.source == "local" and not self.local_dir:
            raise C.ParamError(f"{prefix}.local_dir: source 'local' needs the folder of an existing COCO copy")


def fetch_annotations(base: C.Base, cfg: FetchCocoConfig, root: Path = ANNOTATIONS_ROOT) -> dict:
    """Write ``root/annotations/`` afresh (the official zip replaces it only once verified); return its
    SOURCE.json dict."""
    dest = root / "annotations"
    if cfg.source == "official":
        return S.fetch_annotations(root, "official", url=cfg.annotations_url, sha256=cfg.sha256, md5=cfg.md5,
                                   cache=CACHE_DIR)
    if dest.exists():
        shutil.rmtree(dest)
    if cfg.source == "embedded":
        summary = S.write_coco_sample(root, seed=base.seed, images=False)
        info = {"source": "embedded", "note": "COCO-format sample drawn by code, not COCO data",
                "images": summary["images"]}
    else:
        info = S.fetch_annotations(root, "local", local_dir=cfg.local_dir)
    write_json(dest / "SOURCE.json", info)
    return info


def fetch_selected_images(base: C.Base, cfg: FetchCocoConfig, root: Path = ANNOTATIONS_ROOT,
                          selection_path: Path = SELECTION, out: Path = IMAGES_DIR) -> dict:
    """Fetch the images select_coco kept into ``out``; return its SOURCE.json dict."""
    selection = read_json(selection_path)
    wanted = []
    for split in S.SPLITS:
        ids = set(selection["splits"][split]["image_ids"])
        images = read_json(S.annotation_path(root, "person_keypoints", split))["images"]
        wanted += [(split, img) for img in images if img["id"] in ids]
    tmp = None
    try:
        if cfg.source == "embedded":
            tmp = Path(tempfile.mkdtemp(prefix="coco_sample_"))
            S.write_coco_sample(tmp, seed=base.seed, images=True)
            result = S.fetch_images(wanted, out, "local", tmp, num_workers=1)
        elif cfg.source == "local":
            result = S.fetch_images(wanted, out, "local", cfg.local_dir, num_workers=cfg.num_workers)
        else:
            result = S.fetch_images(wanted, out, "url", num_workers=cfg.num_workers)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    info = {"source": cfg.source, "selected": len(wanted), **result, "license": S.LICENSE}
    write_json(out / "SOURCE.json", info)
    return info


def main(argv: list[str] | None = None) -> None:
    """``python -m stages.fetch_coco {annotations,images} [--params P] [--profile sample|real]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    what = argparse.ArgumentParser(add_help=False)
    what.add_argument("what", choices=("annotations", "images"), nargs="?")
    known, rest = what.parse_known_args(argv)
    args = C.cli(__doc__, rest)
    if known.what is None:
        raise C.ParamError("say what to fetch: python -m stages.fetch_coco annotations | images")
    base, cfg = C.load(FetchCocoConfig, "fetch_coco", C.read_params(args.params, PARAMS), args.profile)
    if known.what == "annotations":
        info = fetch_annotations(base, cfg)
        print(f"fetch_coco_annotations: {info['source']} -> {ANNOTATIONS_ROOT / 'annotations'}")
    else:
        info = fetch_selected_images(base, cfg)
        print(f"fetch_coco_images: {info['selected']} selected: {info['counts']} -> {IMAGES_DIR}")


if __name__ == "__main__":
    C.run(main)
