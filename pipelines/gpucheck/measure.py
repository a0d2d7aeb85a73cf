"""The GPU check's measurements: each a function ``fn(probe, **options)`` for :func:`~pipelines.gpucheck.runner.run_measurements`.

Every one times the project's own path (the stage's functions, the stage's batching, data loading and workers)
against the original one-image-at-a-time path on the same models, side by side in one process, and puts its
figures with ``probe.put`` as soon as each is known, so a measurement cut at its cap keeps what it had. Models are
the stand-ins :func:`build_models` writes: the real sizes (``size="real"``, :mod:`pipelines.standins.real_size`)
or the tiny ones of the offline sample (``size="tiny"``, the CPU self-check). Images are FaceSynthetics-like
samples rendered by code as 512 px PNGs, decoded from disk like the real ones.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.gpucheck.runner import Probe, SkipMeasurement
from pipelines.reports import package_versions

SIZES = ("real", "tiny")
IMAGE_SIZE = 512  # the FaceSynthetics set's side, as the stages read it
PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "huggingface-hub", "datasets", "spiga",
            "clean-fid", "numpy", "pillow", "opencv-python-headless")
MODEL_DIRS = {"spiga": "spiga/spiga_300wpublic.pt", "blip": "blip", "sd_base": "sd_base", "controlnet": "controlnet",
              "clip": "clip", "inception": "inception/inception-2015-12-05.pt"}


# ------------------------------------------------------------------------------------------------ helpers


def _device(name: str) -> torch.device:
    """The device ``name`` resolves to, with the stages' process settings (:func:`pipelines.runtime.init_runtime`:
    TF32 and cuDNN autotuning on CUDA, seeds), which both paths of a comparison then share."""
    from pipelines.runtime import init_runtime

    return init_runtime(name, "fp32").device


def _sync(device: torch.device) -> None:
    from pipelines.runtime import synchronize

    synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``, the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1024 ** 3 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _warmup_size(device: torch.device, batch_size: int) -> int:
    """Items in a warm-up batch: a full batch on CUDA (cuDNN autotunes per shape), one elsewhere."""
    return batch_size if device.type == "cuda" else 1


def _precisions(device: torch.device) -> list[str]:
    """fp32, and on CUDA the half precisions it runs (on the CPU half precision is no faster: SPIGA in bf16 ran
    over ten times slower than fp32 on 2 cores)."""
    if device.type == "cuda":
        return ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    return ["fp32"]


def landmark_drift(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict | None:
    """Per-landmark distance in pixels between two runs' landmarks of the same faces (by id): mean, p99, max and
    the number of faces both have; None when they share none."""
    common = sorted(set(reference) & set(other))
    if not common:
        return None
    diff = np.concatenate([np.linalg.norm(reference[i] - other[i], axis=-1).ravel() for i in common])
    return {"mean": float(diff.mean()), "p99": float(np.percentile(diff, 99)), "max": float(diff.max()),
            "faces": len(common)}


def environment() -> dict:
    """The machine the check ran on: device name and memory, driver, torch, CUDA and cuDNN, packages, CPUs."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(),
                            "packages": package_versions(PACKAGES)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, device_memory_gib=props.total_memory / 1024 ** 3,
                    multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                    device_count=torch.cuda.device_count())
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True)
            info["driver"] = out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
    else:
        info.update(device_name=f"CPU ({platform.processor() or platform.machine()})", driver=None)
    return info


def model_paths(work_dir: str | Path) -> dict[str, Path]:
    """Where :func:`build_models` puts each stand-in under ``work_dir``."""
    return {role: Path(work_dir) / "models" / rel for role, rel in MODEL_DIRS.items()}


def sample_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / "raw"


# ------------------------------------------------------------------------------------------- measurements


def build_models(probe: Probe, *, work_dir: str, size: str, seed: int = 0) -> None:
    """Write the stand-ins of ``size`` under ``work_dir/models`` (kept for a rerun of the same size) and put the
    seconds each took."""
    if size not in SIZES:
        raise ValueError(f"size {size!r} is not one of {', '.join(SIZES)}")
    from pipelines.standins.inception import build_inception_standin
    from pipelines.standins.spiga import build_spiga_standin

    root = Path(work_dir) / "models"
    marker = root / "BUILT.json"
    if marker.is_file() and json.loads(marker.read_text()).get("size") == size:
        probe.put("reused", True)
        return
    shutil.rmtree(root, ignore_errors=True)
    paths = model_paths(work_dir)
    if size == "real":
        from pipelines.standins import real_size as R

        builders = {
            "spiga": lambda: build_spiga_standin(paths["spiga"], seed),
            "inception": lambda: build_inception_standin(paths["inception"], seed),
            "sd_base+controlnet": lambda: R.build_sd_real_size(paths["sd_base"], paths["controlnet"], seed),
            "blip": lambda: R.build_blip_real_size(paths["blip"], seed),
            "clip": lambda: R.build_clip_real_size(paths["clip"], seed),
        }
    else:
        from pipelines.standins.registry import build_standin

        builders = {
            "spiga": lambda: build_spiga_standin(paths["spiga"], seed),
            "inception": lambda: build_inception_standin(paths["inception"], seed),
            "sd_base+controlnet": lambda: (build_standin("sd_base", paths["sd_base"], seed),
                                           build_standin("controlnet", paths["controlnet"], seed)),
            "blip": lambda: build_standin("blip", paths["blip"], seed),
            "clip": lambda: build_standin("clip", paths["clip"], seed),
        }
    for role, build in builders.items():
        t0 = time.perf_counter()
        build()
        probe.put(f"{role}.build_seconds", time.perf_counter() - t0)
    marker.write_text(json.dumps({"size": size}))
    probe.put("reused", False)


def data_path(probe: Probe, *, work_dir: str, num_images: int, num_workers: int, batch_size: int,
              seed: int = 0) -> None:
    """Render ``num_images`` 512 px sample faces as PNGs (once), then decode them through a ``DataLoader``
    with ``num_workers`` workers and with none: images/s, the rate the GPU paths below cannot exceed."""
    from pipelines.sources.facesynthetics import list_samples
    from pipelines.sources.sample_faces import write_sample

    raw = sample_dir(work_dir)
    if not _done_marker(raw).is_file() or len(list_samples(raw)) < num_images:
        _done_marker(raw).unlink(missing_ok=True)
        shutil.rmtree(raw, ignore_errors=True)
        t0 = time.perf_counter()
        write_sample(raw, num_images, num_broken=0, seed=seed, size=IMAGE_SIZE)
        _done_marker(raw).touch()
        probe.put("render_seconds", time.perf_counter() - t0)
    files = [s.image_path for s in list_samples(raw)[:num_images]]
    probe.put("num_images", len(files))
    probe.put("image_size", IMAGE_SIZE)
    for workers in dict.fromkeys([num_workers, 0]):
        loader = torch.utils.data.DataLoader(_DecodedImages(files), batch_size=batch_size, num_workers=workers,
                                             collate_fn=_as_list)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        probe.put(f"decode_images_per_s.workers_{workers}", len(files) / (time.perf_counter() - t0))


class _DecodedImages(torch.utils.data.Dataset):
    """512 px PNG files decoded by the stages' reader (picklable, for DataLoader workers)."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        from pipelines.sources.facesynthetics import read_image

        return read_image(self.files[i], IMAGE_SIZE)


def _as_list(batch: list) -> list:
    return batch


class _TimedInfer:
    """A batch function that counts the seconds spent inside it (device synchronised): the rest of a sharded
    map's wall time is waiting for data (and writing shards)."""

    def __init__(self, infer: Callable[[list], list], device: torch.device):
        self.infer, self.device, self.seconds = infer, device, 0.0

    def __call__(self, batch: list) -> list:
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.infer(batch)
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def _done_marker(path: Path) -> Path:
    """The file that says ``path`` (a folder a measurement makes for a later one) was made whole."""
    return path.with_name(path.name + ".done")


def _require(path: Path, maker: str) -> None:
    """Skip (:class:`SkipMeasurement`) unless the earlier measurement ``maker`` made ``path`` whole."""
    if not _done_marker(path).is_file():
        raise SkipMeasurement(f"{path} was not made: the {maker} measurement did not finish")


def _require_inputs(work_dir: str) -> None:
    """The stand-ins (build_models) and the rendered faces (data_path) every model measurement reads."""
    if not (Path(work_dir) / "models" / "BUILT.json").is_file():
        raise SkipMeasurement("the models were not built: the build_models measurement did not finish")
    _require(sample_dir(work_dir), "data_path")


def _sharded_run(out_dir: Path, schema: Any, samples: list, load: Callable, infer: Callable, batch_size: int,
                 num_workers: int, device: torch.device, config: dict, inputs: Callable) -> dict:
    """One pass of the stage's sharded map over ``samples`` into a fresh ``out_dir`` (with the stage's
    per-file input digests, ``inputs``): images/s and the share of the time the model waited (data loading,
    digests and shard writing)."""
    from pipelines.shards import ShardedMap

    _done_marker(out_dir).unlink(missing_ok=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    timed = _TimedInfer(infer, device)
    t0 = time.perf_counter()
    result = ShardedMap(out_dir, schema, shard_size=max(1, len(samples))).run(
        samples, [s.id for s in samples], load, timed, config, batch_size=batch_size, num_workers=num_workers,
        desc=out_dir.name, inputs=inputs)
    seconds = time.perf_counter() - t0
    _done_marker(out_dir).touch()
    return {"images_per_s": len(samples) / seconds, "seconds": seconds, "batch_size": batch_size,
            "num_workers": num_workers, "wait_fraction": max(0.0, 1 - timed.seconds / seconds),
            "failures": dict(result.failures)}


def annotate(probe: Probe, *, work_dir: str, device: str, batch_size: int, num_workers: int, num_images: int,
             num_original: int, box_margin: float, min_box_inside: float) -> None:
    """SPIGA: the annotate stage's sharded map (PNG decoding in ``num_workers`` workers, batched forward) in
    fp32 and each half precision (with the landmark difference to fp32 in pixels), against the released
    framework one image at a time (fp32)."""
    import cv2

    from pipelines.faces.annotate import ANNOTATION_SCHEMA, face_inputs, load_face, spiga_batch_fn
    from pipelines.faces.boxes import face_box_from_landmarks
    from pipelines.faces.spiga import SpigaAnnotator, original_inference
    from pipelines.shards import read_shards
    from pipelines.sources.facesynthetics import list_samples, read_landmarks

    _require_inputs(work_dir)
    dev = _device(device)
    samples = list_samples(sample_dir(work_dir))[:num_images]
    weights = model_paths(work_dir)["spiga"]
    load = functools.partial(load_face, image_size=IMAGE_SIZE, box_margin=box_margin, min_box_inside=min_box_inside)
    landmarks: dict[str, np.ndarray] = {}
    for precision in _precisions(dev):
        spiga = SpigaAnnotator.load(weights, dev, precision)
        infer = spiga_batch_fn(spiga)
        infer([load(s) for s in samples[:_warmup_size(dev, batch_size)]])  # warm-up: allocation, cuDNN autotuning
        out = Path(work_dir) / f"annotations_{precision}"
        _reset_peak(dev)
        probe.put(f"ours.{precision}", {**_sharded_run(out, ANNOTATION_SCHEMA, samples, load, infer, batch_size,
                                                       num_workers, dev, {"precision": precision}, face_inputs),
                                        "peak_memory_gib": _peak_gib(dev)})
        table = read_shards(out)
        ok = [i for i, good in enumerate(table.column("ok").to_pylist()) if good]
        ids = table.column("id").to_pylist()
        lms = table.column("landmarks").to_pylist()
        landmarks_p = {ids[i]: np.asarray(lms[i], dtype=np.float64) for i in ok}
        if precision == "fp32":
            landmarks = landmarks_p
        else:
            probe.put(f"landmark_drift_px.{precision}", landmark_drift(landmarks, landmarks_p))
        del spiga
    spiga = SpigaAnnotator.load(weights, dev, "fp32")
    model = spiga.model
    originals = samples[:num_original]

    def original() -> None:
        for s in originals:
            box = face_box_from_landmarks(read_landmarks(s.landmarks_path), box_margin)
            original_inference(model, cv2.imread(str(s.image_path)), [box], dev)

    for s in originals[:1]:  # warm-up
        original_inference(model, cv2.imread(str(s.image_path)),
                           [face_box_from_landmarks(read_landmarks(s.landmarks_path), box_margin)], dev)
    seconds = _timed(original, dev)
    probe.put("original.fp32", {"images_per_s": len(originals) / seconds, "seconds": seconds, "batch_size": 1})


def caption(probe: Probe, *, work_dir: str, device: str, precision: str, batch_size: int, num_workers: int,
            num_images: int, num_original: int) -> None:
    """BLIP: the caption stage's sharded map (decoding and the image processor in workers, one ``generate``
    per batch) against one ``generate`` per image, the same model and precision."""
    from pipelines.captions import (
        CAPTION_SCHEMA,
        BlipCaptioner,
        caption_batch_fn,
        caption_inputs,
        load_caption_input,
        original_caption,
    )
    from pipelines.runtime import resolve_precision
    from pipelines.sources.facesynthetics import list_samples, read_image

    _require_inputs(work_dir)
    dev = _device(device)
    precision = resolve_precision(precision, dev)
    blip = BlipCaptioner.load(model_paths(work_dir)["blip"], dev, precision)
    samples = list_samples(sample_dir(work_dir))[:num_images]
    load = functools.partial(load_caption_input, image_size=IMAGE_SIZE, image_processor=blip.processor.image_processor)
    infer = caption_batch_fn(blip)
    infer([load(s) for s in samples[:batch_size]])  # warm-up
    _reset_peak(dev)
    probe.put("precision", precision)
    probe.put("ours", {**_sharded_run(Path(work_dir) / "captions", CAPTION_SCHEMA, samples, load, infer, batch_size,
                                      num_workers, dev, {"precision": precision}, caption_inputs),
                     "peak_memory_gib": _peak_gib(dev)})
    images = [read_image(s.image_path, IMAGE_SIZE) for s in samples[:num_original]]
    original_caption(blip.model, blip.processor, images[0], dev)  # warm-up
    seconds = _timed(lambda: [original_caption(blip.model, blip.processor, im, dev) for im in images], dev)
    probe.put("original", {"images_per_s": len(images) / seconds, "seconds": seconds, "batch_size": 1})


def assemble(probe: Probe, *, work_dir: str, num_workers: int, num_original: int, line_width: int,
             rows_per_file: int, validation_count: int) -> None:
    """Drawing and assembly: the assemble stage (OpenCV drawing in ``num_workers`` processes, PNG encoding,
    parquet) on the annotate and caption measurements' shards, against one matplotlib figure per drawing."""
    from pipelines.faces.draw import draw_landmarks, draw_landmarks_matplotlib
    from pipelines.facesynthetics_dataset import AssemblyOptions, assemble_dataset
    from pipelines.shards import read_shards

    work = Path(work_dir)
    annotations, captions = work / "annotations_fp32", work / "captions"
    _require(annotations, "annotate")
    _require(captions, "caption")
    table = read_shards(annotations)
    lms = [np.asarray(v, dtype=np.float64) for v, ok in zip(table.column("landmarks").to_pylist(),
                                                            table.column("ok").to_pylist(), strict=True) if ok]
    opts = AssemblyOptions(image_size=IMAGE_SIZE, line_width=line_width, validation_count=validation_count,
                           nme_failure_threshold=0.1, rows_per_file=rows_per_file, num_workers=num_workers)
    out = work / "dataset"
    _done_marker(out).unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = assemble_dataset(opts, sample_dir(work_dir), annotations, captions, out, work / "dataset_report.json")
    seconds = time.perf_counter() - t0
    _done_marker(out).touch()
    rows = report["rows"]["total"]
    probe.put("ours", {"images_per_s": rows / seconds, "seconds": seconds, "rows": rows, "num_workers": num_workers})
    t0 = time.perf_counter()
    for lm in lms[:num_original]:
        draw_landmarks(lm, IMAGE_SIZE, line_width)
    draw_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for lm in lms[:num_original]:
        draw_landmarks_matplotlib(lm, IMAGE_SIZE)
    mpl_s = time.perf_counter() - t0
    n = len(lms[:num_original])
    probe.put("draw_only", {"ours_images_per_s": n / draw_s, "original_images_per_s": n / mpl_s,
                            "speedup": mpl_s / draw_s, "images": n})


def sample(probe: Probe, *, work_dir: str, device: str, precision: str, resolution: int, steps: int,
           batch_size: int, num_original: int, guidance_scale: float = 7.5) -> None:
    """SD + ControlNet sampling through our loop: batches of ``batch_size`` against one image at a time,
    same pipeline, scheduler (UniPC), steps and seeds; images/s and peak memory."""
    from PIL import Image

    from pipelines.generation import generate_images, load_controlnet_pipeline
    from pipelines.runtime import resolve_precision

    _require_inputs(work_dir)
    dev = _device(device)
    precision = resolve_precision(precision, dev)
    paths = model_paths(work_dir)
    pipe = load_controlnet_pipeline(paths["sd_base"], paths["controlnet"], "unipc", dev, precision)
    condition = Image.new("RGB", (resolution, resolution))
    probe.put("settings", {"precision": precision, "resolution": resolution, "steps": steps, "scheduler": "unipc",
                           "guidance_scale": guidance_scale, "batch_size": batch_size})

    def run(n: int, seed0: int) -> None:
        generate_images(pipe, [condition] * n, ["photo of a face"] * n, list(range(seed0, seed0 + n)), resolution,
                        steps, guidance_scale)

    run(1, 0)  # warm-up, at both batch shapes on CUDA (cuDNN autotunes per shape)
    if dev.type == "cuda":
        run(batch_size, 0)
    _reset_peak(dev)
    seconds = _timed(lambda: run(batch_size, 100), dev)
    probe.put("ours", {"images_per_s": batch_size / seconds, "seconds": seconds, "batch_size": batch_size,
                       "peak_memory_gib": _peak_gib(dev)})
    seconds = _timed(lambda: [run(1, 200 + k) for k in range(num_original)], dev)
    probe.put("original", {"images_per_s": num_original / seconds, "seconds": seconds, "batch_size": 1})


def train(probe: Probe, *, work_dir: str, device: str, resolution: int, train_batch_size: int, warmup_steps: int,
          timed_steps: int, mixed_precision: list[str], gradient_checkpointing: list[bool],
          dataloader_num_workers: int) -> None:
    """ControlNet training steps/s and peak memory per mixed precision x gradient checkpointing, each in a fresh
    process (:func:`pipelines.training.bench.run_matrix`), on the assembled dataset; ratios to fp32."""
    from pipelines.training.bench import ratios_to_baseline, run_matrix
    from pipelines.training.controlnet import TrainSettings

    work = Path(work_dir)
    dataset = work / "dataset"
    _require(dataset, "assemble")
    cpu = _device(device).type == "cpu"
    settings = TrainSettings(resolution=resolution, train_batch_size=train_batch_size,
                             dataloader_num_workers=dataloader_num_workers, learning_rate=1e-5)
    configs: dict[str, dict] = {}
    for prec in mixed_precision:
        if cpu and prec == "fp16":
            continue  # accelerate autocasts no fp16 on the CPU
        for gc in gradient_checkpointing:
            result = run_matrix(settings, model_paths(work_dir)["sd_base"], dataset, work / "train",
                                mixed_precision=[prec], gradient_checkpointing=[gc], warmup_steps=warmup_steps,
                                timed_steps=timed_steps, cpu=cpu)
            for name, r in result["configs"].items():
                configs[name] = {k: v for k, v in r.items() if k != "step_seconds"}
                probe.put(f"configs.{name}", configs[name])
            probe.put("ratios", ratios_to_baseline(configs))


def features(probe: Probe, *, work_dir: str, device: str, num_images: int, batch_size: int, num_workers: int) -> None:
    """Feature extraction for FID (clean-fid's Inception, from PNG files in ``num_workers`` workers) and CLIP
    (ViT-L/14 image-text similarity), batched against one image at a time."""
    from pipelines.metrics.clip_score import clip_similarities, load_clip
    from pipelines.metrics.fid import image_features, load_inception
    from pipelines.sources.facesynthetics import list_samples, read_image

    _require_inputs(work_dir)
    dev = _device(device)
    paths = model_paths(work_dir)
    files = [s.image_path for s in list_samples(sample_dir(work_dir))[:num_images]]
    inception = load_inception(paths["inception"], dev)
    image_features(files[:batch_size], inception, batch_size, 0, dev)  # warm-up, both batch shapes
    image_features(files[:1], inception, 1, 0, dev)
    seconds = _timed(lambda: image_features(files, inception, batch_size, num_workers, dev), dev)
    one = files[: max(1, min(len(files), batch_size))]
    seconds_one = _timed(lambda: [image_features([f], inception, 1, 0, dev) for f in one], dev)
    probe.put("inception", {"ours_images_per_s": len(files) / seconds, "original_images_per_s": len(one) / seconds_one,
                            "speedup": (len(files) / seconds) / (len(one) / seconds_one), "batch_size": batch_size,
                            "num_workers": num_workers})
    clip = load_clip(paths["clip"], dev)
    images = [read_image(f, IMAGE_SIZE) for f in files]
    texts = ["photo of a face"]
    clip_similarities(images[:batch_size], texts, clip, dev, batch_size)  # warm-up, both batch shapes
    clip_similarities(images[:1], texts, clip, dev, 1)
    seconds = _timed(lambda: clip_similarities(images, texts, clip, dev, batch_size), dev)
    few = images[: len(one)]
    seconds_one = _timed(lambda: [clip_similarities([im], texts, clip, dev, 1) for im in few], dev)
    probe.put("clip", {"ours_images_per_s": len(images) / seconds, "original_images_per_s": len(few) / seconds_one,
                       "speedup": (len(images) / seconds) / (len(few) / seconds_one), "batch_size": batch_size})


#: name -> function, in the order they run (assemble reads annotate's and caption's shards, train assemble's dataset)
MEASUREMENTS: dict[str, Callable[..., None]] = {
    "build_models": build_models, "data_path": data_path, "annotate": annotate, "caption": caption,
    "assemble": assemble, "sample": sample, "train": train, "features": features,
}


def target(name: str) -> str:
    """The runner target of the measurement ``name``."""
    if name not in MEASUREMENTS:
        raise ValueError(f"no measurement {name!r}; known: {', '.join(MEASUREMENTS)}")
    return f"{__name__}:{MEASUREMENTS[name].__name__}"

