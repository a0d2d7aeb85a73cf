"""The prepared GPU check (``make gpu-check``): every GPU path of the project timed at the real models' sizes.

Not a DVC stage: it is run by hand on a GPU machine (README, "GPU check"), offline, on a bare python with torch,
transformers and accelerate plus the wheels ``make gpu-wheels`` downloads. It builds random-weight models of the
real sizes by code (SPIGA 300W, BLIP-large, SD 2.1-base UNet/VAE/text encoder and a ControlNet of that UNet,
clean-fid's Inception, CLIP ViT-L/14; :mod:`pipelines.standins.real_size`), renders 512 px sample faces as PNGs,
and times side by side, in one run, the project's batched paths against the original one-image-at-a-time paths
(:mod:`pipelines.gpucheck.measure`): decoding, SPIGA annotate (fp32 and half precision, with the landmark drift),
BLIP captioning, drawing + assembly, SD + ControlNet sampling, ControlNet training (mixed precision x gradient
checkpointing), FID/CLIP feature extraction. Batch sizes, workers and precisions are the ``real`` profile's of
the stages measured.

Everything runs under one time budget (``gpu_check.budget_s``), each measurement under its own cap, in a worker
process that is cut at the cap with what it had measured (:mod:`pipelines.gpucheck.runner`); out of memory is
recorded, not fatal. Writes one JSON per measurement and ``summary.json`` (a table and the 100,000-face
annotate + caption + assemble projection) under ``--out`` (default reports/bench/gpu/), and prints the table.
It runs the ``real`` profile whatever ``base.profile`` says; ``--profile sample`` is the CPU self-check: tiny
stand-ins, a few images, a 60 s budget (tests run it).
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pipelines.gpucheck import measure
from pipelines.gpucheck.runner import Measurement, run_measurements
from pipelines.reports import write_json
from pipelines.standins import STANDIN_NOTE
from stages import config as C
from stages.schemas.bench_train import BenchTrainConfig

PARAMS = ("base.profile", "base.seed", "base.device", "gpu_check", "annotate.batch_size", "annotate.num_workers",
          "annotate.precision", "annotate.box_margin", "annotate.min_box_inside", "caption.batch_size",
          "caption.num_workers", "caption.precision", "assemble.line_width", "assemble.rows_per_file",
          "assemble.num_workers", "train_controlnet.dataloader_num_workers")
OUT_DIR = Path("reports/bench/gpu")
FACES = 100_000  # the projection's dataset size
log = logging.getLogger("stages.gpu_check")


@dataclass(frozen=True)
class SampleSettings:
    resolution: int
    steps: int
    batch_size: int
    num_original: int  # images sampled one at a time

    def validate(self, prefix: str) -> None:
        C.positive(prefix, resolution=self.resolution, steps=self.steps, batch_size=self.batch_size,
                   num_original=self.num_original)


@dataclass(frozen=True)
class GpuCheckConfig:
    """The ``gpu_check`` section of params.yaml (and the stage settings it times, from their sections)."""

    sizes: Literal["real", "tiny"]
    budget_s: float
    work_dir: str
    num_images: int
    num_original: int
    features_batch_size: int
    caps_s: dict[str, float]
    sample: SampleSettings
    train: BenchTrainConfig  # the training matrix, as bench_train_controlnet's
    annotate_batch_size: int = 1
    annotate_num_workers: int = 0
    annotate_precision: str = "fp32"
    box_margin: float = 0.0
    min_box_inside: float = 0.0
    caption_batch_size: int = 1
    caption_num_workers: int = 0
    caption_precision: str = "auto"
    line_width: int = 4
    rows_per_file: int = 1000
    assemble_num_workers: int = 0
    train_num_workers: int = 0

    FROM_OTHER_SECTIONS = {
        "annotate_batch_size": "annotate.batch_size", "annotate_num_workers": "annotate.num_workers",
        "annotate_precision": "annotate.precision", "box_margin": "annotate.box_margin",
        "min_box_inside": "annotate.min_box_inside", "caption_batch_size": "caption.batch_size",
        "caption_num_workers": "caption.num_workers", "caption_precision": "caption.precision",
        "line_width": "assemble.line_width", "rows_per_file": "assemble.rows_per_file",
        "assemble_num_workers": "assemble.num_workers", "train_num_workers": "train_controlnet.dataloader_num_workers",
    }

    def validate(self, prefix: str) -> None:
        C.positive(prefix, budget_s=self.budget_s, num_images=self.num_images, num_original=self.num_original,
                   features_batch_size=self.features_batch_size)
        unknown = sorted(set(self.caps_s) - set(measure.MEASUREMENTS))
        missing = sorted(set(measure.MEASUREMENTS) - set(self.caps_s))
        if unknown or missing:
            raise C.ParamError(f"{prefix}.caps_s: one cap per measurement ({', '.join(measure.MEASUREMENTS)}); "
                               f"unknown: {unknown or 'none'}, missing: {missing or 'none'}")
        C.positive(f"{prefix}.caps_s", **self.caps_s)
        if self.num_original > self.num_images:
            raise C.ParamError(f"{prefix}.num_original: {self.num_original} > num_images {self.num_images}")


def plan(cfg: GpuCheckConfig, device: str, seed: int, work_dir: str) -> list[Measurement]:
    """The measurements in the order they run, with their options and caps."""
    common = {"work_dir": work_dir}
    kwargs: dict[str, dict[str, Any]] = {
        "build_models": {"size": cfg.sizes, "seed": seed},
        "data_path": {"num_images": cfg.num_images, "num_workers": cfg.annotate_num_workers,
                      "batch_size": cfg.annotate_batch_size, "seed": seed},
        "annotate": {"device": device, "batch_size": cfg.annotate_batch_size, "num_workers": cfg.annotate_num_workers,
                     "num_images": cfg.num_images, "num_original": cfg.num_original, "box_margin": cfg.box_margin,
                     "min_box_inside": cfg.min_box_inside},
        "caption": {"device": device, "precision": cfg.caption_precision, "batch_size": cfg.caption_batch_size,
                    "num_workers": cfg.caption_num_workers, "num_images": cfg.num_images,
                    "num_original": cfg.num_original},
        "assemble": {"num_workers": cfg.assemble_num_workers, "num_original": cfg.num_original,
                     "line_width": cfg.line_width, "rows_per_file": cfg.rows_per_file, "validation_count": 0},
        "sample": {"device": device, "precision": "auto", **asdict(cfg.sample)},
        "train": {"device": device, "dataloader_num_workers": cfg.train_num_workers, **asdict(cfg.train)},
        "features": {"device": device, "num_images": cfg.num_images, "batch_size": cfg.features_batch_size,
                     "num_workers": cfg.annotate_num_workers},
    }
    return [Measurement(name, measure.target(name), cfg.caps_s[name], {**common, **kwargs[name]})
            for name in measure.MEASUREMENTS]


def _get(record: dict | None, *keys: str) -> Any:
    """``record["results"][keys[0]][keys[1]]...`` or None (results are keyed by the names measurements put)."""
    node: Any = (record or {}).get("results", {})
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(records: list[dict], annotate_precision: str, device_type: str) -> dict:
    """The table rows (ours, original, ratio per measured path) and the 100,000-face projection."""
    by = {r["name"]: r for r in records}
    prec = annotate_precision if annotate_precision != "auto" else ("fp16" if device_type == "cuda" else "fp32")
    rows = []

    def row(path: str, ours: float | None, original: float | None, unit: str = "images/s", note: str = "") -> None:
        if ours is None and original is None and not note:
            return  # not measured (its status says why)
        rows.append({"path": path, "ours": ours, "original": original, "ratio": _ratio(ours, original), "unit": unit,
                     "note": note})

    dp = by.get("data_path")
    for key, value in sorted(_get(dp).items() if dp else []):
        if key.startswith("decode_images_per_s."):
            row(f"decode 512 px PNG ({key.split('.')[-1].replace('_', ' ')})", value, None)
    for p in ("fp32", "fp16", "bf16"):
        ours = _get(by.get("annotate"), f"ours.{p}")
        if ours:
            drift = _get(by.get("annotate"), f"landmark_drift_px.{p}")
            note = f"wait {ours['wait_fraction']:.0%}" + (f"; drift mean {drift['mean']:.3f} px, max {drift['max']:.3f}"
                                                         if drift else "")
            row(f"SPIGA annotate {p}", ours["images_per_s"], _get(by.get("annotate"), "original.fp32", "images_per_s"),
                note=note)
    cap = by.get("caption")
    if _get(cap, "ours"):
        row(f"BLIP caption {_get(cap, 'precision')}", _get(cap, "ours", "images_per_s"),
            _get(cap, "original", "images_per_s"), note=f"wait {_get(cap, 'ours', 'wait_fraction'):.0%}")
    asm = by.get("assemble")
    row("draw (OpenCV vs matplotlib)", _get(asm, "draw_only", "ours_images_per_s"),
        _get(asm, "draw_only", "original_images_per_s"))
    row("assemble dataset (draw + PNG + parquet)", _get(asm, "ours", "images_per_s"), None)
    smp = by.get("sample")
    if _get(smp, "settings"):
        row("SD + ControlNet sample", _get(smp, "ours", "images_per_s"), _get(smp, "original", "images_per_s"),
            note="{resolution} px, {steps} steps, {precision}, batch {batch_size}".format(**_get(smp, "settings")))
    for name, r in sorted((_get(by.get("train"), "configs") or {}).items()):
        if "error" in r:
            row(f"train ControlNet {name}", None, None, "steps/s", r["error"])
        else:
            row(f"train ControlNet {name}", r["steps_per_second"], None, "steps/s",
                f"peak {r['peak_memory_gib']:.2f} GiB ({r['peak_memory_kind']})")
    for part in ("inception", "clip"):
        r = _get(by.get("features"), part)
        if r:
            row(f"features {part}", r["ours_images_per_s"], r["original_images_per_s"])
    rates = {"annotate": _get(by.get("annotate"), f"ours.{prec}", "images_per_s"),
             "caption": _get(cap, "ours", "images_per_s"), "assemble": _get(asm, "ours", "images_per_s")}
    projection: dict[str, Any] = {"faces": FACES, "annotate_precision": prec,
                                  "seconds": {k: FACES / v if v else None for k, v in rates.items()}}
    if all(rates.values()):
        total = sum(projection["seconds"].values())
        projection.update(total_seconds=total, total_minutes=total / 60,
                          method="100,000 / measured images/s of each stage's batched path, the stages one after "
                                 "the other as dvc repro runs them (decoding included)")
    else:
        projection["missing"] = sorted(k for k, v in rates.items() if not v)
    return {"table": rows, "projection_100k": projection,
            "status": {r["name"]: r["status"] for r in records}}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}" if x < 1000 else f"{x:,.0f}"


def print_table(summary: dict, env: dict, total_seconds: float) -> None:
    print(f"\nGPU check on {env.get('device_name')} (driver {env.get('driver')}, torch {env.get('torch')}, "
          f"CUDA {env.get('cuda')}), {total_seconds:.0f} s")
    print(f"{'path':44s} {'ours':>10s} {'original':>10s} {'ratio':>7s}  unit       note")
    for r in summary["table"]:
        print(f"{r['path'][:44]:44s} {_fmt(r['ours']):>10s} {_fmt(r['original']):>10s} "
              f"{('x' + format(r['ratio'], '.1f')) if r['ratio'] else '-':>7s}  {r['unit']:10s} {r['note']}")
    p = summary["projection_100k"]
    if "total_minutes" in p:
        parts = ", ".join(f"{k} {v / 60:.1f} min" for k, v in p["seconds"].items())
        print(f"\n100,000 faces annotate ({p['annotate_precision']}) + caption + assemble: "
              f"{p['total_minutes']:.1f} min ({parts})")
    else:
        print(f"\n100,000-face projection: not measured ({', '.join(p['missing'])} missing)")
    bad = {k: v for k, v in summary["status"].items() if v != "ok"}
    if bad:
        print("not ok: " + ", ".join(f"{k} {v}" for k, v in bad.items()))


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where the JSON files go (default: %(default)s)")
    parser.add_argument("--work-dir", default=None, help="models and images it builds (default: gpu_check.work_dir)")
    parser.add_argument("--budget-s", type=float, default=None, help="override gpu_check.budget_s")
    parser.add_argument("--only", nargs="+", choices=list(measure.MEASUREMENTS), default=None,
                        help="run these measurements only (a later one may need an earlier one's files)")


def main(argv: list[str] | None = None) -> None:
    args = C.cli(__doc__, argv, _options)
    params = C.read_params(args.params, PARAMS)
    # the real sizes unless --profile says otherwise: base.profile is the DAG's switch, not this check's
    base, cfg = C.load(GpuCheckConfig, "gpu_check", params, args.profile or "real")
    budget = cfg.budget_s if args.budget_s is None else args.budget_s
    if budget <= 0:
        raise C.ParamError(f"--budget-s: must be > 0, got {budget}")
    device = base.device or "auto"
    work_dir = str(Path(args.work_dir or cfg.work_dir).resolve())
    measurements = [m for m in plan(cfg, device, base.seed, work_dir) if args.only is None or m.name in args.only]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    context = {"sizes": cfg.sizes, "profile": base.profile, "budget_s": budget, "standin_models": STANDIN_NOTE}
    settings = {m.name: m.kwargs for m in measurements}

    def save(record: dict, env: dict) -> None:
        write_json(out / f"{record['name']}.json",
                   {**record, "environment": env, **context, "settings": settings[record["name"]]})
        log.info("gpu_check: %s %s in %.1f s", record["name"], record["status"], record["seconds"])

    start = time.monotonic()
    records, env = run_measurements(measurements, budget, setup="pipelines.gpucheck.measure:environment",
                                    on_record=save)
    total = time.monotonic() - start
    summary = summarize(records, cfg.annotate_precision, "cuda" if env.get("cuda_available") else "cpu")
    write_json(out / "summary.json", {**summary, "environment": env, **context, "total_seconds": total})
    print_table(summary, env, total)


if __name__ == "__main__":
    C.run(main)
