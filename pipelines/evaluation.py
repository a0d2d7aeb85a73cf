"""Evaluating a generated set against its conditions and reference images: one report per model.

Generic metrics (FID and KID with clean-fid, mode ``clean``; Inception Score and CLIP score with
torchmetrics) and control fidelity (does each generated face follow its landmarks and its pose: SPIGA
re-detection through the dataset's own annotator, a face detector, the head-pose error). The report names
everything that makes it comparable across commits.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from pipelines.faces.spiga import SpigaAnnotator
from pipelines.generation import METADATA, OFF_DISTRIBUTION_METADATA
from pipelines.metrics import fid as F
from pipelines.metrics.clip_score import clip_score, load_clip, prompt_adherence
from pipelines.metrics.control import control_fidelity, make_detector, scale_landmarks
from pipelines.reports import ModelInfo, read_json

CONDITION_FRAME = 512  # the dataset's landmarks are in the 512 px frame of its images
#: What reports/metrics/<model>.json holds (:func:`pipelines.reports.split_report`): the numbers two models are
#: compared on; implementation, mode, feature layer, reference hash, settings, per-prompt breakdown, models
#: and packages go to its .provenance.json (throughput to reports/bench/evaluate_<model>.json)
REPORT_METRICS = (
    "num_images", "fid.value", "fid.num_reference", "kid.value", "inception_score.mean", "inception_score.std",
    "clip_score.value", "prompt_adherence.clip_score", "prompt_adherence.prompt_win_rate",
    "prompt_adherence.num_images", "control.count", "control.face_detection_rate", "control.spiga_nonfinite",
    "control.landmark_nme.count", "control.landmark_nme.mean", "control.landmark_nme.median",
    "control.landmark_nme.p90", "control.landmark_nme.failure_rate", "control.pose_error_deg",
    "uses_standin_models",
)
SMALL_N_NOTE = ("FID is biased upward at small n (it depends on n; compare FID only at equal n, and prefer KID, "
                "which is unbiased, below a few thousand images)")


@dataclass(frozen=True)
class EvaluationOptions:
    """How to evaluate (the stage fills it from params.yaml)."""

    kid_subsets: int
    kid_subset_size: int
    is_splits: int
    nme_failure_threshold: float
    face_detector: str
    face_detector_threshold: float
    face_detector_min_iou: float
    control_resolution: int
    box_margin: float
    batch_size: int
    num_workers: int
    off_distribution_reference_text: str = "a photo of a person's face"


def read_jobs(generated_dir: Path, metadata: str = METADATA) -> tuple[list[str], list[str], list[Path]]:
    """ids, prompts and image paths listed in a generate stage's ``metadata`` file (its order)."""
    meta = generated_dir / metadata
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} is missing: run the generate stage first")
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    paths = [generated_dir / r["file_name"] for r in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} generated images are missing, e.g. {missing[0]}")
    return [r["id"] for r in rows], [r["prompt"] for r in rows], paths


def condition_rows(dataset_dir: Path, split: str, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The conditioning landmarks (N, 68, 2; the drawing's source) and SPIGA head pose (N, 6) of ``ids``."""
    from pipelines.hfdata import load_local_split

    ds = load_local_split(dataset_dir, split).select_columns(["id", "landmarks", "headpose"])
    at = {i: n for n, i in enumerate(ds["id"])}
    unknown = [i for i in ids if i not in at]
    if unknown:
        raise ValueError(f"generated ids not in {dataset_dir} split {split}: {unknown[:5]}")
    rows = ds.select([at[i] for i in ids])
    return (np.asarray(rows["landmarks"], dtype=np.float64).reshape(len(ids), 68, 2),
            np.asarray(rows["headpose"], dtype=np.float64).reshape(len(ids), 6))


def evaluate_generated(generated_dir: Path, dataset_dir: Path, split: str, reference_npz: Path, reference_json: Path,
                       inception_dir: Path, clip_dir: Path, spiga_weights: Path, models: list[ModelInfo],
                       opts: EvaluationOptions, device: Any = "cpu") -> dict:
    """All metrics of one generated set; ``models`` are the manifests of the evaluation models."""
    ids, prompts, paths = read_jobs(generated_dir)
    summary_path = generated_dir / "summary.json"
    gen_summary = read_json(summary_path) if summary_path.is_file() else {}
    n = len(ids)
    if n < 2:
        raise ValueError(f"{generated_dir}: {n} generated image(s); FID/KID need at least 2")
    timings: dict[str, float] = {}

    start = time.perf_counter()
    inception = F.load_inception(inception_dir, device)
    gen_feats = F.image_features(paths, inception, opts.batch_size, opts.num_workers, device)
    ref = F.load_reference(reference_npz)
    ref_info = read_json(reference_json)
    mu, sigma = F.stats(gen_feats)
    fid = F.fid_from_stats(mu, sigma, ref["mu"], ref["sigma"])
    kid = F.kid_from_features(gen_feats, ref["features"], opts.kid_subsets, opts.kid_subset_size)
    splits = max(1, min(opts.is_splits, n))
    is_mean, is_std = F.inception_score(paths, inception, splits=splits, batch_size=opts.batch_size, device=device)
    timings["inception_images_per_s"] = 2 * n / (time.perf_counter() - start)

    start = time.perf_counter()
    images = [Image.open(p).convert("RGB") for p in paths]
    clip_model = load_clip(clip_dir, device)
    clip = clip_score(images, prompts, batch_size=opts.batch_size, device=device, model_and_processor=clip_model)
    timings["clip_images_per_s"] = n / (time.perf_counter() - start)
    adherence = None
    if (generated_dir / OFF_DISTRIBUTION_METADATA).is_file():
        _, off_prompts, off_paths = read_jobs(generated_dir, OFF_DISTRIBUTION_METADATA)
        if off_paths:
            adherence = prompt_adherence([Image.open(p).convert("RGB") for p in off_paths], off_prompts,
                                         opts.off_distribution_reference_text, clip_model, device, opts.batch_size)

    start = time.perf_counter()
    cond_landmarks, cond_pose = condition_rows(dataset_dir, split, ids)
    size = opts.control_resolution
    resized = [cv2.resize(np.asarray(im), (size, size), interpolation=cv2.INTER_CUBIC) for im in images]
    control = control_fidelity(
        resized, scale_landmarks(cond_landmarks, CONDITION_FRAME, size), cond_pose[:, :3],
        SpigaAnnotator.load(spiga_weights, device, "fp32"),
        make_detector(opts.face_detector, opts.face_detector_threshold),
        box_margin=opts.box_margin, batch_size=opts.batch_size, nme_failure_threshold=opts.nme_failure_threshold,
        min_iou=opts.face_detector_min_iou, reference_size=CONDITION_FRAME)["summary"]
    timings["control_images_per_s"] = n / (time.perf_counter() - start)

    gen_models = [ModelInfo(**m) for m in (gen_summary.get("models") or {}).values()]
    all_models = gen_models + list(models)
    return {
        "model_name": gen_summary.get("model_name", generated_dir.name),
        "num_images": n,
        "fid": {"value": fid, "implementation": F.cleanfid_version(), "mode": F.MODE, "feature_layer": F.FEATURE_LAYER,
                "image_size": F.IMAGE_SIZE, "num_generated": n, "num_reference": int(ref_info["count"]),
                "reference_sha256": ref_info["sha256"], "reference_split": split, "note": SMALL_N_NOTE},
        "kid": {"value": kid, "num_subsets": opts.kid_subsets, "subset_size": min(opts.kid_subset_size, n,
                                                                                int(ref_info["count"]))},
        "inception_score": {"mean": is_mean, "std": is_std, "splits": splits,
                            "implementation": "torchmetrics InceptionScore on clean-fid's Inception logits"},
        "clip_score": {"value": clip, "implementation": "torchmetrics CLIPScore", "texts": "the conditions' captions"},
        "prompt_adherence": adherence and {
            **adherence, "prompts": "the fixed off-distribution prompts (generate.off_distribution_prompts), each on "
                                    "the first conditions with the condition's own seed",
            "why": "an overfit landmark ControlNet draws a face whatever the prompt: win rate and CLIP score fall"},
        "control": {**control, "condition_landmarks": "the dataset's SPIGA landmarks the conditioning image was drawn from",
                    "condition_pose": "the dataset's SPIGA head pose of the source image (yaw, pitch, roll)",
                    "resolution": size},
        "throughput": timings,
        "models": {m.name: m.to_dict() for m in all_models},
        "uses_standin_models": any(m.standin for m in all_models),
        "generation": {k: gen_summary.get(k) for k in ("base_seed", "count", "split")},
    }
