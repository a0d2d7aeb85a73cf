"""Assembling the landmark-conditioned FaceSynthetics dataset from annotation and caption shards.

Joins the annotate (SPIGA) and caption shards on id, draws each conditioning image ("spiga_seg" style)
from SPIGA's landmarks, writes a Hugging Face parquet dataset with its card (splits ``train`` and
``validation`` by the shared hash rule, :func:`pipelines.hfdata.hash_split`, on ``validation_count`` ids) and
returns the dataset report. The columns are :data:`SCHEMA` (the face box in
:data:`~pipelines.faces.boxes.BOX_CONVENTION`). diffusers' train_controlnet.py reads the result with its default
column names.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import cv2
import datasets
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from pipelines import images
from pipelines.faces.boxes import BOX_CONVENTION, xywh_to_xyxy
from pipelines.faces.draw import draw_landmarks
from pipelines.hfdata import DatasetSchema, ParquetShardWriter, hash_split, hash_split_rule, write_card
from pipelines.metrics.landmarks import nme, summarize_nme
from pipelines.reports import ModelInfo, provenance, read_json, split_report, write_report
from pipelines.shards import read_shards, read_summary
from pipelines.sources.facesynthetics import CORRUPT_IMAGE, SampleError, sample_error, sample_paths

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
#: What the dataset report's metrics file holds (:func:`pipelines.reports.split_report`); the rest (NME label,
#: models, packages, params, runtime, data source, options, flags) goes to its .provenance.json
REPORT_METRICS = ("rows", "skipped", "skipped_total", "validation_count_requested", "validation_count_capped",
                  "landmark_nme.count", "landmark_nme.mean", "landmark_nme.median", "landmark_nme.p90",
                  "landmark_nme.failure_rate", "assemble_images_per_s", "uses_standin_models", "uses_embedded_sample")
NME_LABEL = ("SPIGA vs the sample's own first 68 points, inter-ocular (outer eye corners) normalisation")
TRAIN_FLAGS = ("--dataset_name={dir} --image_column=image --conditioning_image_column=conditioning_image "
               "--caption_column=text")

#: The dataset's columns. ``image``, ``conditioning_image`` and ``text`` are the column names train_controlnet.py
#: reads by default.
SCHEMA = DatasetSchema(
    features=datasets.Features({
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "conditioning_image": datasets.Image(),
        "text": datasets.Value("string"),
        "landmarks": datasets.Array2D(shape=(68, 2), dtype="float32"),
        "headpose": datasets.List(datasets.Value("float32"), length=6),
        "face_box": datasets.List(datasets.Value("float32"), length=4),
        "source_landmarks": datasets.Array2D(shape=(70, 2), dtype="float32"),
        "segmentation": datasets.Image(),
    }),
    descriptions={
        "id": "the FaceSynthetics sample id (`000000`: files `000000.png`, `000000_seg.png`, `000000_ldmks.txt`).",
        "image": "the rendered face, 512 x 512 RGB PNG.",
        "conditioning_image": "the drawing of SPIGA's 68 landmarks (the ControlNet condition), RGB PNG.",
        "text": "the caption.",
        "landmarks": "SPIGA's 68 points, 68 x 2 pixels (x, y) of `image`.",
        "headpose": "SPIGA's head pose in SPIGA's convention: Euler angles (yaw, pitch, roll) then translation.",
        "face_box": f"the face box, {BOX_CONVENTION}; the sample's own 70 points' min/max grown by the annotate "
                    "stage's `box_margin` on every side.",
        "source_landmarks": "the sample's own 70 points (68 + the two pupils), 70 x 2 pixels.",
        "segmentation": "FaceSynthetics' per-pixel classes (19 classes + 255 ignore), grayscale PNG.",
    },
)

# skip reasons of this step (the annotate/caption stages' own reasons are passed through)
MISSING_CAPTION = "missing_caption"
MISSING_ANNOTATION = "missing_annotation"
ANNOTATION_FAILED = "annotation_failed"  # a failed annotation row without a reason
CAPTION_FAILED = "caption_failed"


@dataclass(frozen=True)
class AssemblyOptions:
    """How to assemble (the stage fills it from params.yaml)."""

    image_size: int  # raw images must be image_size x image_size; drawings are made at this size
    line_width: int  # conditioning stroke width at 512 px
    validation_count: int  # rows held out as `validation` (capped at the rows kept)
    nme_failure_threshold: float
    rows_per_file: int
    num_workers: int  # drawing processes (0: in the main process)


# ---------------------------------------------------------------------------------------------- join


def _points(table: pa.Table, column: str, k: int) -> np.ndarray:
    """A list<list<float>> column of ``table`` (no nulls) as an (N, k, 2) float32 array."""
    col = table.column(column).combine_chunks()
    if col.null_count:
        raise ValueError(f"{column}: {col.null_count} null rows among ok rows")
    flat = col.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if flat.size != len(table) * k * 2:
        raise ValueError(f"{column}: expected {k}x2 points per row, got {flat.size} values for {len(table)} rows")
    return flat.reshape(len(table), k, 2)


def join(annotations: pa.Table, captions: pa.Table) -> tuple[list[str], Counter, list[str]]:
    """Kept ids (annotation order, then caption-only ids), skip counts by reason, and skipped ids.

    A row is kept when both its annotation and its caption are ok; otherwise the annotation's reason
    comes first, then the caption's, then ``missing_caption`` / ``missing_annotation``.
    """
    ann = {i: (ok, err) for i, ok, err in zip(annotations.column("id").to_pylist(), annotations.column("ok").to_pylist(),
                                              annotations.column("error").to_pylist(), strict=True)}
    cap = {i: (ok, err) for i, ok, err in zip(captions.column("id").to_pylist(), captions.column("ok").to_pylist(),
                                              captions.column("error").to_pylist(), strict=True)}
    order = list(ann) + [i for i in cap if i not in ann]
    kept, skipped_ids, skipped = [], [], Counter()
    for i in order:
        a, c = ann.get(i), cap.get(i)
        if a is not None and not a[0]:
            reason = a[1] or ANNOTATION_FAILED
        elif c is not None and not c[0]:
            reason = c[1] or CAPTION_FAILED
        elif c is None:
            reason = MISSING_CAPTION
        elif a is None:
            reason = MISSING_ANNOTATION
        else:
            kept.append(i)
            continue
        skipped[reason] += 1
        skipped_ids.append(i)
    return kept, skipped, skipped_ids


# ------------------------------------------------------------------------------------------ row work


@dataclass(frozen=True)
class _Job:
    id: str
    image_path: str
    segmentation_path: str
    landmarks: np.ndarray
    size: int
    line_width: int


def _png(path: str, size: int, target: str, segmentation: bool) -> tuple[dict, str | None]:
    """The image feature value of a raw PNG (its own bytes when stored as ``target``, else converted;
    :func:`pipelines.images.encode`) and the conversion applied. Raises :class:`SampleError`."""
    try:
        data, note = images.encode(path, (size, size), target)
    except images.ImageError as exc:
        raise sample_error(exc, segmentation) from exc
    return {"bytes": data, "path": None}, note


def _build(job: _Job) -> tuple[str, dict | None, str | None, list[str]]:
    """Draw the conditioning image and read the raw image and segmentation: (id, parts or None, reason,
    conversions applied as ``column: note``)."""
    try:
        image, image_note = _png(job.image_path, job.size, images.RGB, segmentation=False)
        seg, seg_note = _png(job.segmentation_path, job.size, images.LABELS, segmentation=True)
    except SampleError as exc:
        return job.id, None, exc.reason, []
    drawing = draw_landmarks(job.landmarks, size=job.size, line_width=job.line_width)
    ok, png = cv2.imencode(".png", cv2.cvtColor(drawing, cv2.COLOR_RGB2BGR))
    if not ok:
        return job.id, None, "encode_error", []
    notes = [f"{col}: {n}" for col, n in (("image", image_note), ("segmentation", seg_note)) if n]
    return job.id, {"image": image, "segmentation": seg, "conditioning_image": {"bytes": png.tobytes(), "path": None}}, \
        None, notes


# ------------------------------------------------------------------------------------------- summary


def _model(summary: dict) -> ModelInfo | None:
    m = summary.get("model")
    return ModelInfo(**m) if isinstance(m, dict) else None


def _card_body(report: dict, out_dir: Path, models: list[ModelInfo], source: dict) -> str:
    """The card's prose, generated from the report's numbers."""
    rows, nme_block = report["rows"], report["landmark_nme"]
    embedded = source.get("source") == "embedded"
    lines = ["# FaceSynthetics with SPIGA landmark conditioning", ""]
    if report["uses_standin_models"] or embedded:
        what = []
        if report["uses_standin_models"]:
            what.append("stand-in models (random weights of the real architectures: their landmarks and captions "
                        "mean nothing)")
        if embedded:
            what.append("the embedded sample (faces generated by code, not Microsoft FaceSynthetics)")
        lines += [f"**Warning: this build used {' and '.join(what)}. Do not train on it; it only checks the "
                  "pipeline.**", ""]
    lines += [
        "Landmark-conditioned faces for training a ControlNet with diffusers' `train_controlnet.py`, rebuilt after "
        "the \"Uncanny Faces\" dataset (`pcuenq/face_synthetics_spiga`, `multimodalart/facesyntheticsspigacaptioned`).",
        "",
        "## How it was built",
        "",
        f"1. Source: {source.get('source', 'unknown')}"
        + (f" (subset {source['subset']}, {source.get('url', '')})" if source.get("subset") else "")
        + (f" — {source['description']}" if source.get("description") else "") + ".",
        "2. `annotate`: SPIGA 68 landmarks and head pose per image, face box from the sample's own landmarks.",
        "3. `caption`: one caption per image.",
        "4. `assemble`: the conditioning image drawn from SPIGA's landmarks (black background; jaw lime, eyebrows "
        "yellow, nose orange, eyes magenta filled, outer lips cyan filled, inner lips blue filled; "
        f"{report['options']['line_width']} px lines at 512 px, anti-aliased, OpenCV).",
        "",
        "Models:",
        "",
    ]
    if models:
        for m in models:
            lines.append(f"- {m.name}: `{m.id}` revision `{m.revision}` from {m.source}"
                         + (" — **stand-in (random weights)**" if m.standin else ""))
    else:
        lines.append("- none recorded")
    lines += ["", "## Contents", "", "| split | rows |", "|---|---|"]
    for s in SPLITS:
        lines.append(f"| {s} | {rows[s]} |")
    lines.append(f"| total | {rows['total']} |")
    lines += ["", f"Splits: {hash_split_rule(rows['validation'])}"
              + (f" (Asked for {report['validation_count_requested']}, capped at the rows kept.)"
                 if report["validation_count_capped"] else "")]
    lines += ["", f"Skipped: {report['skipped_total']}" + (" rows:" if report["skipped"] else " rows.")]
    for reason, count in sorted(report["skipped"].items()):
        lines.append(f"- `{reason}`: {count}")
    lines += ["", images.describe_conversions(report["image_conversions"], labels=True)]
    lines += ["", "## Columns", "", *SCHEMA.columns_markdown(), ""]
    lines += ["## Landmark agreement", "", f"NME, {NME_LABEL}, over {nme_block['count']} rows:"]
    if nme_block["count"]:
        lines.append(f"mean {nme_block['mean']:.4f}, median {nme_block['median']:.4f}, p90 {nme_block['p90']:.4f}, "
                     f"failure rate {nme_block['failure_rate']:.3f} (NME > {nme_block['failure_threshold']}).")
        lines.append("The source points are projections of 3D points (they do not follow the visible contour), "
                     "so this measures agreement, not SPIGA's accuracy.")
    else:
        lines.append("none computable.")
    lines += ["", "## Training", "", "```bash",
              "accelerate launch train_controlnet.py \\",
              "  --pretrained_model_name_or_path=stabilityai/stable-diffusion-2-1-base \\",
              f"  {TRAIN_FLAGS.format(dir=out_dir.as_posix())} \\",
              "  --resolution=512 --learning_rate=1e-5 --train_batch_size=4",
              "```", "",
              "The column flags are the script's defaults and may be left out.", "",
              "## License", "",
              f"{source.get('license') or 'The FaceSynthetics data are under Microsoft’s FaceSynthetics license (LICENSE.txt in microsoft/FaceSynthetics).'}",
              ""]
    return "\n".join(lines)


def assemble_dataset(opts: AssemblyOptions, raw_dir: Path, annotations_dir: Path, captions_dir: Path, out_dir: Path,
                     report_path: Path, params: dict | None = None) -> dict:
    """Build the dataset under ``out_dir`` and its report at ``report_path`` (the numbers of
    ``REPORT_METRICS``; everything else in its ``.provenance.json``); return the whole report.

    ``params`` (the stage's parameters) are recorded in the report's provenance.
    """
    cfg = opts
    annotations, captions = read_shards(annotations_dir), read_shards(captions_dir)
    kept, skipped, _ = join(annotations, captions)
    ann_ok = annotations.filter(annotations.column("ok"))
    index = {i: n for n, i in enumerate(ann_ok.column("id").to_pylist())}
    rows_at = [index[i] for i in kept]
    ann_ok = ann_ok.take(pa.array(rows_at, type=pa.int64()))
    cap_ok = captions.filter(captions.column("ok"))
    texts = dict(zip(cap_ok.column("id").to_pylist(), cap_ok.column("text").to_pylist(), strict=True))

    landmarks = _points(ann_ok, "landmarks", 68)
    source_landmarks = _points(ann_ok, "source_landmarks", 70)
    headpose = np.asarray(ann_ok.column("headpose").to_pylist(), dtype=np.float32).reshape(len(kept), 6)
    face_box = xywh_to_xyxy(np.asarray(ann_ok.column("face_box").to_pylist()).reshape(len(kept), 4)).astype(np.float32)

    n_val = min(cfg.validation_count, len(kept))
    if n_val < cfg.validation_count:
        log.warning("assemble.validation_count=%d but only %d rows are kept: validation gets %d",
                    cfg.validation_count, len(kept), n_val)
    split_of = hash_split(kept, n_val)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    features = SCHEMA.features
    jobs = [_Job(i, str(sample_paths(raw_dir, i).image_path), str(sample_paths(raw_dir, i).segmentation_path),
                 landmarks[n], opts.image_size, cfg.line_width) for n, i in enumerate(kept)]
    written: list[int] = []  # positions in ``kept`` that made it into the dataset
    conversions: Counter = Counter()  # "column: note" -> rows converted
    start = time.perf_counter()
    writers = {s: ParquetShardWriter(out_dir, s, features, cfg.rows_per_file) for s in SPLITS}
    try:
        pool = Pool(cfg.num_workers) if cfg.num_workers > 0 else None
        try:
            results = pool.imap(_build, jobs, chunksize=8) if pool else map(_build, jobs)
            for n, (sid, parts, reason, notes) in enumerate(tqdm(results, total=len(jobs), desc="assemble", unit="row")):
                if parts is None:
                    skipped[reason or CORRUPT_IMAGE] += 1
                    continue
                conversions.update(notes)
                writers[split_of[sid]].write({
                    "id": sid, "text": texts[sid], "landmarks": landmarks[n], "headpose": headpose[n],
                    "face_box": face_box[n], "source_landmarks": source_landmarks[n], **parts})
                written.append(n)
        finally:
            if pool:
                pool.close()
                pool.join()
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    seconds = time.perf_counter() - start
    counts = {s: writers[s].rows_written for s in SPLITS}
    total = sum(counts.values())
    if total == 0:
        raise RuntimeError(f"no rows to assemble: {dict(skipped)} skipped; check the annotate and caption stages")

    ann_summary, cap_summary = read_summary(annotations_dir), read_summary(captions_dir)
    models = [m for m in (_model(ann_summary), _model(cap_summary)) if m is not None]
    source_path = raw_dir / "SOURCE.json"
    source = read_json(source_path) if source_path.is_file() else {}
    idx = np.asarray(written, dtype=np.int64)
    per_face = nme(landmarks[idx], source_landmarks[idx, :68]) if len(idx) else np.zeros(0)
    report: dict[str, Any] = {
        "rows": {**counts, "total": total},
        "validation_count_requested": cfg.validation_count,
        "validation_count_capped": n_val < cfg.validation_count,
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": int(sum(skipped.values())),
        "image_conversions": dict(sorted(conversions.items())),
        "landmark_nme": {"label": NME_LABEL, **summarize_nme(per_face, cfg.nme_failure_threshold)},
        "assemble_images_per_s": total / seconds if seconds > 0 else None,
        **provenance(models, runtime={"annotate": ann_summary.get("runtime"), "caption": cap_summary.get("runtime")},
                     params=params),
        "data_source": source or None,
        "uses_standin_models": any(m.standin for m in models),
        "uses_embedded_sample": source.get("source") == "embedded",
        "dataset_dir": out_dir.as_posix(),
        "train_controlnet_flags": TRAIN_FLAGS.format(dir=out_dir.as_posix()),
        "options": asdict(opts),
    }
    splits = {s: counts[s] for s in SPLITS if counts[s]}  # an empty split would have no data files
    write_card(out_dir, pretty_name="FaceSynthetics SPIGA (landmark-conditioned)", features=features, splits=splits,
               split_bytes={s: writers[s].num_bytes for s in splits}, license="other",
               source_datasets=["microsoft/FaceSynthetics"], task_categories=["text-to-image", "image-to-image"],
               tags=["controlnet", "faces", "landmarks", "synthetic"],
               body_markdown=_card_body(report, out_dir, models, source))
    write_report(report_path, *split_report(report, REPORT_METRICS))
    return report
