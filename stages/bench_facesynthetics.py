"""Stage bench_facesynthetics: images/s of our batched paths against the original one-image-at-a-time way.

Same models, same images, measured side by side in one run, alternating the two paths for several rounds
(so their ratio survives a noisy machine): the annotate stage's load + batch functions vs the released SPIGA
framework's per-image path; the caption stage's batched generation vs one image per generate; OpenCV drawing
vs a matplotlib figure per image. Every timing includes image decoding. Writes reports/bench/facesynthetics.json
(medians, speedups) and its .provenance.json (every round's rate, method, models, packages).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import torch

from pipelines.captions import BlipCaptioner, caption_batch_fn, load_caption_input, original_caption
from pipelines.faces.annotate import load_face, spiga_batch_fn
from pipelines.faces.boxes import face_box_from_landmarks
from pipelines.faces.draw import draw_landmarks, draw_landmarks_matplotlib
from pipelines.faces.spiga import SpigaAnnotator, original_inference
from pipelines.reports import provenance, read_model_manifest, split_report, write_report
from pipelines.runtime import init_runtime, resolve_precision, synchronize
from pipelines.sources.facesynthetics import SampleError, list_samples, read_image, read_landmarks
from stages import config as C
from stages.schemas.annotate import AnnotateConfig
from stages.schemas.caption import CaptionConfig

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "base.seed", "base.device", "base.image_size", "bench_facesynthetics", "annotate", "caption")

RAW = Path("data/raw/facesynthetics")
MODELS = Path("data/models")
REPORT = Path("reports/bench/facesynthetics.json")


@dataclass(frozen=True)
class BenchConfig:
    num_images: int
    rounds: int  # timed passes per path, alternating ours / original; the median is reported

    def validate(self, prefix: str) -> None:
        C.positive(prefix, num_images=self.num_images, rounds=self.rounds)


def _compare(ours: Callable[[], None], original: Callable[[], None], n: int, rounds: int,
             device: torch.device, batch_size: int) -> dict:
    """Images/s of both paths (each processes the same ``n`` images): one untimed warm-up each, then
    ``rounds`` alternating timed passes; medians and their ratio."""
    rates: dict[str, list[float]] = {"ours": [], "original": []}
    for fn in (ours, original):
        fn()
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("original", original)):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            rates[name].append(n / (time.perf_counter() - start))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"ours_images_per_s": med["ours"], "original_images_per_s": med["original"],
            "speedup": med["ours"] / med["original"], "batch_size": batch_size,
            "rounds_images_per_s": rates}


def _chunks(seq: list, size: int) -> list[list]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def main(argv: list[str] | None = None) -> None:
    args = C.cli(__doc__, argv)
    params = C.read_params(args.params, PARAMS)
    base, cfg = C.load(BenchConfig, "bench_facesynthetics", params, args.profile)
    _, ann = C.load(AnnotateConfig, "annotate", params, args.profile)
    _, cap = C.load(CaptionConfig, "caption", params, args.profile)
    runtime = init_runtime(base.device, "fp32", base.seed)
    dev = runtime.device

    samples = []  # the first readable samples
    for s in list_samples(RAW):
        try:
            read_image(s.image_path, base.image_size)
            read_landmarks(s.landmarks_path)
        except SampleError:
            continue
        samples.append(s)
        if len(samples) == cfg.num_images:
            break
    if not samples:
        raise SystemExit(f"no readable samples under {RAW}")
    n = len(samples)

    spiga_info = read_model_manifest(MODELS / "spiga")
    spiga = SpigaAnnotator.load(MODELS / "spiga" / spiga_info.id, dev, resolve_precision(ann.precision, dev))
    spiga_infer = spiga_batch_fn(spiga)

    def spiga_ours() -> None:  # what the annotate stage does per batch
        for chunk in _chunks(samples, ann.batch_size):
            spiga_infer([load_face(s, base.image_size, ann.box_margin, ann.min_box_inside) for s in chunk])

    def spiga_original() -> None:  # the released framework, one image at a time
        for s in samples:
            box = face_box_from_landmarks(read_landmarks(s.landmarks_path), ann.box_margin)
            original_inference(spiga.model, cv2.imread(str(s.image_path)), [box], dev)

    blip_info = read_model_manifest(MODELS / "blip")
    blip = BlipCaptioner.load(MODELS / "blip", dev, resolve_precision(cap.precision, dev))
    blip_infer = caption_batch_fn(blip)

    def blip_ours() -> None:  # what the caption stage does per batch
        for chunk in _chunks(samples, cap.batch_size):
            blip_infer([load_caption_input(s, base.image_size, blip.processor.image_processor) for s in chunk])

    def blip_original() -> None:  # one generate per image, as the original datasets.map(num_proc=1) did
        for s in samples:
            original_caption(blip.model, blip.processor, read_image(s.image_path), dev)

    landmarks = [read_landmarks(s.landmarks_path)[:68] for s in samples]

    def draw_ours() -> None:
        for lm in landmarks:
            draw_landmarks(lm, base.image_size)

    def draw_original() -> None:
        for lm in landmarks:
            draw_landmarks_matplotlib(lm, base.image_size)

    results = {
        "annotate": _compare(spiga_ours, spiga_original, n, cfg.rounds, dev, ann.batch_size),
        "caption": _compare(blip_ours, blip_original, n, cfg.rounds, dev, cap.batch_size),
        "draw": _compare(draw_ours, draw_original, n, cfg.rounds, dev, 1),
    }
    models = [spiga_info, blip_info]
    write_report(REPORT, *split_report({
        **results,
        "num_images": n,
        "rounds": cfg.rounds,
        "method": "one warm-up pass per path, then alternating timed passes over the same images in one process; "
                  "medians; images/s include decoding; drawing excludes PNG encoding on both paths; 'original' = "
                  "released SPIGA framework per image, BLIP generate per image, one matplotlib figure per drawing",
        "uses_standin_models": any(m.standin for m in models),
        **provenance(models, runtime.describe()),
    }, [f"{part}.{k}" for part in results for k in ("ours_images_per_s", "original_images_per_s", "speedup",
                                                    "batch_size")] + ["num_images", "rounds", "uses_standin_models"]))
    for part, r in results.items():
        print(f"{part:9s} ours {r['ours_images_per_s']:8.2f} img/s   original {r['original_images_per_s']:8.2f} "
              f"img/s   x{r['speedup']:.2f}")


if __name__ == "__main__":
    C.run(main)
