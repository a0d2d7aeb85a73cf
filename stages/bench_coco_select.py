"""Stage bench_coco_select: seconds and peak memory of select_coco on a synthetic file of COCO's size.

Generates by code, into a temporary folder (never committed), a person_keypoints file in the real schema
with ``num_images`` images (54 % of them with people, as in train2017: 64,115 of 118,287) and
``num_persons`` person instances (polygon segmentations of 8-40 vertices, 17 keypoints with visibility flags,
about 1 % crowd regions as uncompressed RLE), then times loading it with pycocotools plus the rule of
pipelines.coco_humans with the ``select_coco`` thresholds, in a fresh process whose peak RSS
(resource.getrusage ru_maxrss) is reported. Writes reports/bench/coco_select.json (seconds, memory, counts)
and its .provenance.json (rule, machine).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.coco_humans import measure_selection
from pipelines.reports import split_report, write_report
from pipelines.sources.coco import write_synthetic_annotations
from stages import config as C
from stages.schemas.select_coco import SelectCocoConfig

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.seed", "bench_coco_select", "select_coco")

REPORT = Path("reports/bench/coco_select.json")


@dataclass(frozen=True)
class BenchCocoConfig:
    """The ``bench_coco_select`` section of params.yaml."""

    num_images: int
    num_persons: int

    def validate(self, prefix: str) -> None:
        C.positive(prefix, num_images=self.num_images, num_persons=self.num_persons)


def bench(seed: int, cfg: BenchCocoConfig, select: SelectCocoConfig, report_path: Path = REPORT) -> dict:
    """Generate, measure in a spawned process, write the report; return it."""
    tmp = Path(tempfile.mkdtemp(prefix="coco_bench_"))
    try:
        path = tmp / "person_keypoints_train2017.json"
        t0 = time.perf_counter()
        synthetic = write_synthetic_annotations(path, cfg.num_images, cfg.num_persons, seed)
        synthetic["generate_seconds"] = time.perf_counter() - t0
        with mp.get_context("spawn").Pool(1) as pool:
            measured = pool.apply(measure_selection, (str(path), asdict(select)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"synthetic_file": synthetic, **measured, "rule": asdict(select),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "limit": "must take minutes, not hours, within 8 GB of memory",
              "within_8gb": measured["peak_rss_mib"] < 8 * 1024, "uses_standin_models": False}
    write_report(report_path, *split_report(report, (
        "synthetic_file", "load_seconds", "select_seconds", "total_seconds", "peak_rss_mib", "rss_before_mib",
        "kept", "removed", "within_8gb", "uses_standin_models")), ndigits=3)  # rule, machine, limit: provenance
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the stage (``argv``: the command line, for tests)."""
    args = C.cli(__doc__, argv)
    params = C.read_params(args.params, PARAMS)
    base, cfg = C.load(BenchCocoConfig, "bench_coco_select", params, args.profile)
    _, select = C.load(SelectCocoConfig, "select_coco", params, args.profile)
    r = bench(base.seed, cfg, select)
    print(f"bench_coco_select: {r['synthetic_file']['num_images']} images, {r['synthetic_file']['num_persons']} persons: "
          f"load {r['load_seconds']:.1f} s + select {r['select_seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    C.run(main)
