"""Stage bench_facesynthetics: images/s of our batched paths against the original one-image-at-a-time way.

Same models, same images, measured side by side in one run (so the ratio is meaningful on a noisy
machine): SPIGA batched vs the released framework's per-image path; BLIP batched generation vs one image
per ``generate``; OpenCV drawing vs a matplotlib figure per image. Each timing includes image decoding.
Writes reports/bench/facesynthetics.json.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from pipelines.captions import BlipCaptioner, original_caption
from pipelines.faces.boxes import face_box_from_landmarks
from pipelines.faces.draw import draw_landmarks, draw_landmarks_matplotlib
from pipelines.faces.spiga import SpigaAnnotator, crop_face, original_inference
from pipelines.reports import provenance, read_model_manifest, write_json
from pipelines.runtime import init_runtime, resolve_precision
from pipelines.sources.facesynthetics import SampleError, list_samples, read_image, read_landmarks
from stages import config as C
from stages.annotate import AnnotateConfig
from stages.caption import CaptionConfig

RAW = Path("data/raw/facesynthetics")
MODELS = Path("data/models")
REPORT = Path("reports/bench/facesynthetics.json")


@dataclass(frozen=True)
class BenchConfig:
    num_images: int
    batch_size: int
    num_workers: int  # reserved for decode workers; the timed loops decode in-process on both paths

    def validate(self, prefix: str) -> None:
        C.positive(prefix, num_images=self.num_images, batch_size=self.batch_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn: Callable[[], None], n: int, device: torch.device) -> float:
    """Images/s of ``fn`` (which processes ``n`` images), after one untimed warm-up call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return n / (time.perf_counter() - start)


def _pair(ours: float, original: float, batch_size: int) -> dict:
    return {"ours_images_per_s": ours, "original_images_per_s": original, "speedup": ours / original,
            "batch_size": batch_size}


def _chunks(seq: list, size: int) -> list[list]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def main(argv: list[str] | None = None) -> None:
    args = C.cli(__doc__, argv)
    params = C.read_params(args.params)
    base, cfg = C.load(BenchConfig, "bench_facesynthetics", params, args.profile)
    _, ann = C.load(AnnotateConfig, "annotate", params, args.profile)
    _, cap = C.load(CaptionConfig, "caption", params, args.profile)
    runtime = init_runtime(base.device, "fp32", base.seed)
    dev = runtime.device

    faces = []  # (image path, landmarks) of the first readable samples
    for s in list_samples(RAW):
        try:
            read_image(s.image_path, base.image_size)
            faces.append((s.image_path, read_landmarks(s.landmarks_path)))
        except SampleError:
            continue
        if len(faces) == cfg.num_images:
            break
    if not faces:
        raise SystemExit(f"no readable samples under {RAW}")
    n, bs = len(faces), cfg.batch_size
    boxes = [face_box_from_landmarks(lm, ann.box_margin) for _, lm in faces]

    spiga_info = read_model_manifest(MODELS / "spiga")
    spiga = SpigaAnnotator.load(MODELS / "spiga" / spiga_info.id, dev, resolve_precision(ann.precision, dev))

    def spiga_batched() -> None:
        for chunk in _chunks(list(range(n)), bs):
            crops = [crop_face(read_image(faces[i][0]), boxes[i]) for i in chunk]
            spiga.predict(torch.from_numpy(np.stack([c for c, _ in crops])), np.stack([b for _, b in crops]),
                          np.stack([boxes[i] for i in chunk]))

    def spiga_original() -> None:
        for (path, _), box in zip(faces, boxes, strict=True):
            original_inference(spiga.model, cv2.imread(str(path)), [box], dev)

    blip_info = read_model_manifest(MODELS / "blip")
    blip = BlipCaptioner.load(MODELS / "blip", dev, resolve_precision(cap.precision, dev))

    def blip_batched() -> None:
        for chunk in _chunks([p for p, _ in faces], bs):
            blip.caption(torch.from_numpy(np.stack([blip.preprocess(read_image(p)) for p in chunk])))

    def blip_original() -> None:
        for p, _ in faces:
            original_caption(blip.model, blip.processor, read_image(p), dev)

    def draw_ours() -> None:
        for _, lm in faces:
            draw_landmarks(lm[:68], base.image_size)

    def draw_original() -> None:
        for _, lm in faces:
            draw_landmarks_matplotlib(lm[:68], base.image_size)

    results = {
        "annotate": _pair(_rate(spiga_batched, n, dev), _rate(spiga_original, n, dev), bs),
        "caption": _pair(_rate(blip_batched, n, dev), _rate(blip_original, n, dev), bs),
        "draw": _pair(_rate(draw_ours, n, dev), _rate(draw_original, n, dev), 1),
    }
    models = [spiga_info, blip_info]
    write_json(REPORT, {
        **results,
        "num_images": n,
        "method": "one warm-up pass, then one timed pass per path over the same images, in one process; "
                  "images/s include decoding; 'original' = released SPIGA framework per image, BLIP generate "
                  "per image, one matplotlib figure per drawing",
        "uses_standin_models": any(m.standin for m in models),
        "provenance": provenance(models, runtime.describe()),
    })
    for part, r in results.items():
        print(f"{part:9s} ours {r['ours_images_per_s']:8.2f} img/s   original {r['original_images_per_s']:8.2f} "
              f"img/s   x{r['speedup']:.2f}")


if __name__ == "__main__":
    main()
