"""Stage bench_coco_select: seconds and peak memory of select_coco on a synthetic file of COCO's size.

Generates by code, into a temporary folder (never committed), a person_keypoints file in the real schema
with ``num_images`` images (54 % of them with people, as in train2017: 64,115 of 118,287) and
``num_persons`` person instances (polygon segmentations of 8-40 vertices, 17 keypoints with visibility flags,
about 1 % crowd regions as uncompressed RLE), then times loading it with pycocotools plus the rule of
pipelines.coco_humans with the ``select_coco`` thresholds, in a fresh process whose peak RSS
(resource.getrusage ru_maxrss) is reported. Writes reports/bench/coco_select.json.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipelines.reports import write_json
from stages import config as C
from stages.select_coco import SelectCocoConfig

REPORT = Path("reports/bench/coco_select.json")
PERSON_IMAGE_SHARE = 64115 / 118287  # train2017 images with at least one person


@dataclass(frozen=True)
class BenchCocoConfig:
    """The ``bench_coco_select`` section of params.yaml."""

    num_images: int
    num_persons: int

    def validate(self, prefix: str) -> None:
        C.positive(prefix, num_images=self.num_images, num_persons=self.num_persons)


def write_synthetic_annotations(path: Path, num_images: int, num_persons: int, seed: int = 0) -> dict:
    """Write a synthetic person_keypoints file of the given size; return its counts and size in bytes."""
    rng = np.random.default_rng(seed)
    n_with = max(1, min(num_images, round(num_images * PERSON_IMAGE_SHARE)))
    per = np.ones(n_with, np.int64)
    extra = num_persons - n_with
    if extra > 0:  # skewed like COCO: most images hold few people, some many
        per += np.bincount(rng.choice(n_with, extra, p=_skew(n_with, rng)), minlength=n_with)
    owners = np.repeat(rng.choice(num_images, n_with, replace=False) + 1, per)[:num_persons]
    widths = rng.choice([640, 640, 500, 427, 480], num_images)
    heights = np.where(widths == 640, rng.choice([480, 427, 360], num_images), 640)
    images = [{"license": 1, "file_name": f"{i:012d}.jpg", "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg",
               "height": int(heights[i - 1]), "width": int(widths[i - 1]), "date_captured": "2013-11-14 11:18:45",
               "flickr_url": "", "id": i} for i in range(1, num_images + 1)]
    anns = []
    for k, iid in enumerate(owners.tolist()):
        w, h = int(widths[iid - 1]), int(heights[iid - 1])
        scale = float(np.exp(rng.uniform(np.log(8), np.log(0.45 * min(w, h)))))
        cx, cy = rng.uniform(scale, w - scale), rng.uniform(scale, h - scale)
        crowd = rng.random() < 0.01
        if crowd:
            x0, y0, x1, y1 = int(cx - scale), int(cy - scale / 2), int(cx + scale), int(cy + scale / 2)
            counts, pos = [], 0
            for x in range(x0, x1):  # column-major runs of a rectangle
                start = x * h + y0
                counts += [start - pos, y1 - y0]
                pos = start + (y1 - y0)
            counts.append(w * h - pos)
            segm: object = {"counts": counts, "size": [h, w]}
            kps = [0] * 51
        else:
            n = int(rng.integers(8, 41))
            t = np.sort(rng.uniform(0, 2 * np.pi, n))
            r = scale * rng.uniform(0.6, 1.0, n)
            poly = np.stack([np.clip(cx + 0.5 * r * np.cos(t), 0, w), np.clip(cy + r * np.sin(t), 0, h)], 1)
            segm = [np.round(poly.ravel(), 2).tolist()]
            kp = np.stack([rng.uniform(cx - scale / 2, cx + scale / 2, 17), rng.uniform(cy - scale, cy + scale, 17),
                           rng.choice([0, 1, 2], 17, p=[0.4, 0.1, 0.5])], 1)
            kp[kp[:, 2] == 0, :2] = 0
            kps = [int(v) if j % 3 == 2 else round(float(v), 1) for j, v in enumerate(kp.ravel())]
        area = float(np.pi * 0.5 * scale * scale * 0.8) if not crowd else float(2 * scale * scale)
        anns.append({"segmentation": segm, "num_keypoints": int(sum(1 for v in kps[2::3] if v > 0)), "area": area,
                     "iscrowd": int(crowd), "keypoints": kps, "image_id": iid,
                     "bbox": [round(cx - scale / 2, 2), round(cy - scale, 2), round(scale, 2), round(2 * scale, 2)],
                     "category_id": 1, "id": 900000 + k})
    payload = {"info": {"description": "synthetic, facecontrol bench"}, "licenses": [], "images": images,
               "annotations": anns, "categories": [{"supercategory": "person", "id": 1, "name": "person"}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, separators=(",", ":"))
    return {"num_images": num_images, "images_with_persons": n_with, "num_persons": len(anns),
            "file_bytes": path.stat().st_size}


def _skew(n: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.pareto(2.0, n) + 1.0
    return w / w.sum()


def _measure(path: str, rule: dict) -> dict:
    """Run in a fresh process: load + select, with wall time and this process's peak RSS."""
    from pipelines.coco_humans import SelectionRule, select_images
    from pipelines.sources.coco import load_coco

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    coco = load_coco(path)
    t1 = time.perf_counter()
    result = select_images(coco, SelectionRule(**rule))
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"load_seconds": t1 - t0, "select_seconds": t2 - t1, "total_seconds": t2 - t0,
            "peak_rss_mib": peak / 1024, "rss_before_mib": base / 1024, "kept": result["kept"],
            "removed": result["removed"]}


def bench(seed: int, cfg: BenchCocoConfig, select: SelectCocoConfig, report_path: Path = REPORT) -> dict:
    """Generate, measure in a spawned process, write the report; return it."""
    tmp = Path(tempfile.mkdtemp(prefix="coco_bench_"))
    try:
        path = tmp / "person_keypoints_train2017.json"
        t0 = time.perf_counter()
        synthetic = write_synthetic_annotations(path, cfg.num_images, cfg.num_persons, seed)
        synthetic["generate_seconds"] = time.perf_counter() - t0
        with mp.get_context("spawn").Pool(1) as pool:
            measured = pool.apply(_measure, (str(path), asdict(select)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"synthetic_file": synthetic, **measured, "rule": asdict(select),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "limit": "must take minutes, not hours, within 8 GB of memory",
              "within_8gb": measured["peak_rss_mib"] < 8 * 1024}
    write_json(report_path, report, ndigits=3)
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the stage (``argv``: the command line, for tests)."""
    args = C.cli(__doc__, argv)
    params = C.read_params(args.params)
    base, cfg = C.load(BenchCocoConfig, "bench_coco_select", params, args.profile)
    _, select = C.load(SelectCocoConfig, "select_coco", params, args.profile)
    r = bench(base.seed, cfg, select)
    print(f"bench_coco_select: {r['synthetic_file']['num_images']} images, {r['synthetic_file']['num_persons']} persons: "
          f"load {r['load_seconds']:.1f} s + select {r['select_seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    C.run(main)
