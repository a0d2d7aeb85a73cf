"""Head-pose-labelled face datasets (pitch, yaw, roll, x, y, scale, direction) and their validation.

Two estimators per face, both kept as rows (column ``estimator``): ``spiga`` (SPIGA's own head pose,
converted by :func:`pipelines.faces.pose.spiga_pose_to_ours`) and ``pnp`` (:func:`pipelines.faces.pose.pnp_pose`
on SPIGA's 68 landmarks). Angles follow :mod:`pipelines.faces.pose`'s convention. Pure functions of their
arguments: stages read params and pass values.
"""
from __future__ import annotations

import io
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from pipelines.faces.boxes import BOX_CONVENTION, xywh_to_xyxy
from pipelines.faces.pose import direction, pnp_pose, position_scale, spiga_pose_to_ours
from pipelines.hfdata import DatasetSchema, ParquetShardWriter, write_card
from pipelines.metrics.control import angle_difference

ESTIMATORS = ("spiga", "pnp")
ANGLES = ("yaw", "pitch", "roll")
PLOT_NAME = "label_distribution.png"
CONVENTION = ("degrees, relative to the line of sight to the face; yaw > 0: the face turned toward image-left "
              "(the subject's right); pitch > 0: looking up; roll > 0: tilted clockwise in the image "
              "(R = Rz(roll) Ry(yaw) Rx(-pitch), camera x right, y down, z away)")

# detection outcomes of one image (headpose_photos)
NO_FACE = "no_face"
MULTIPLE_FACES_SKIPPED = "multiple_faces_skipped"
MULTIPLE_FACES_LARGEST = "multiple_faces_kept_largest"
UNREADABLE = "unreadable_image"


_F32 = datasets.Value("float32")
#: The columns of a head-pose dataset (one row per face per estimator)
SCHEMA = DatasetSchema(
    features=datasets.Features({
        "image": datasets.Image(), "yaw": _F32, "pitch": _F32, "roll": _F32, "x": _F32, "y": _F32, "scale": _F32,
        "direction": datasets.Value("string"), "landmarks": datasets.Array2D(shape=(68, 2), dtype="float32"),
        "face_box": datasets.List(_F32, length=4), "estimator": datasets.Value("string"),
        "source": datasets.Value("string"), "id": datasets.Value("string"),
    }),
    descriptions={
        "image": "the photo or rendered face the labels describe, RGB PNG.",
        "yaw": "degrees (convention below).", "pitch": "degrees.", "roll": "degrees.",
        "x": "face-box centre x over the image width.", "y": "face-box centre y over the image height.",
        "scale": "the face box's longer side over the image's shorter side.",
        "direction": "`front`, `left`, `right`, `up` or `down` (rule below).",
        "landmarks": "SPIGA's 68 points, 68 x 2 pixels (x, y).",
        "face_box": f"the face box SPIGA ran on, {BOX_CONVENTION}.",
        "estimator": "`spiga` or `pnp` (which estimator gave yaw, pitch, roll).",
        "source": "where the image came from (`facesynthetics`, `embedded`, `folder`, `hf`).",
        "id": "the image's id in its source (both estimators' rows of one face share it).",
    },
)


def label_face(landmarks: np.ndarray, headpose: np.ndarray, face_box: np.ndarray, width: int, height: int,
               thresholds: Mapping[str, float]) -> list[dict]:
    """The two label rows (``spiga`` then ``pnp``) of one face: yaw, pitch, roll, x, y, scale, direction,
    estimator, landmarks and face box (no image/id/source). ``face_box`` comes in ``[x, y, w, h]`` (SPIGA's
    crop convention) and is written as the datasets' ``[x1, y1, x2, y2]``. A pose that is not finite gives no
    row for that estimator."""
    x, y, scale = position_scale(face_box, width, height)
    poses = {"spiga": spiga_pose_to_ours(np.asarray(headpose, dtype=np.float64)),
             "pnp": np.array(pnp_pose(landmarks, face_box, (width, height)))}
    rows = []
    for est in ESTIMATORS:
        yaw, pitch, roll = (float(v) for v in poses[est])
        if not np.isfinite([yaw, pitch, roll]).all():
            continue
        rows.append({"yaw": yaw, "pitch": pitch, "roll": roll, "x": x, "y": y, "scale": scale,
                     "direction": direction(yaw, pitch, thresholds), "estimator": est,
                     "landmarks": np.asarray(landmarks, dtype=np.float32),
                     "face_box": xywh_to_xyxy(face_box).astype(np.float32)})
    return rows


def select_face(detections: list[tuple[np.ndarray, float]], dominance: float) -> tuple[np.ndarray | None, str | None]:
    """The documented rule for one image's detections: ``(box, note)``.

    No detection: ``(None, 'no_face')``. One: ``(box, None)``. Several: the largest box is kept when its area
    is at least ``dominance`` times the second largest (``note 'multiple_faces_kept_largest'``), otherwise the
    image is skipped (``(None, 'multiple_faces_skipped')``: whose pose would the label be?).
    """
    if not detections:
        return None, NO_FACE
    if len(detections) == 1:
        return np.asarray(detections[0][0], dtype=np.float64), None
    ranked = sorted(detections, key=lambda d: -float(d[0][2] * d[0][3]))
    a0, a1 = (float(d[0][2] * d[0][3]) for d in ranked[:2])
    if a0 >= dominance * a1:
        return np.asarray(ranked[0][0], dtype=np.float64), MULTIPLE_FACES_LARGEST
    return None, MULTIPLE_FACES_SKIPPED


# ---------------------------------------------------------------------------------------------- writing


def _hist_png(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, angle in zip(axes, ("yaw", "pitch"), strict=True):
        for est in ESTIMATORS:
            v = [r[angle] for r in rows if r["estimator"] == est]
            ax.hist(v, bins=np.arange(-90, 91, 5), alpha=0.55, label=f"{est} (n={len(v)})")
        ax.set_xlabel(f"{angle} (deg)")
        ax.set_ylabel("faces")
        ax.legend(fontsize=8)
    axes[0].set_title("yaw > 0: turned to image-left", fontsize=9)
    axes[1].set_title("pitch > 0: looking up", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def distribution(rows: list[dict]) -> dict:
    """Per estimator: row count, direction counts, yaw/pitch/roll mean and percentiles (5, 50, 95)."""
    out: dict[str, Any] = {}
    for est in ESTIMATORS:
        sel = [r for r in rows if r["estimator"] == est]
        block: dict[str, Any] = {"rows": len(sel), "direction": dict(sorted(Counter(r["direction"] for r in sel).items()))}
        for a in ANGLES:
            v = np.array([r[a] for r in sel], dtype=np.float64)
            block[a] = ({"mean": float(v.mean()), "p5": float(np.percentile(v, 5)), "p50": float(np.median(v)),
                         "p95": float(np.percentile(v, 95))} if v.size else None)
        out[est] = block
    return out


def write_headpose_dataset(rows: Iterable[dict], out_dir: Path, *, pretty_name: str, source_note: str,
                           counts: Mapping[str, int], thresholds: Mapping[str, float], uses_standin: bool,
                           rows_per_file: int = 1000, extra_lines: list[str] | None = None) -> dict:
    """Write the rows (each with every column of :data:`SCHEMA`) as split ``train`` under
    ``out_dir``, plus ``label_distribution.png`` (yaw and pitch histograms) and the card; return the summary."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    features = SCHEMA.features
    labels: list[dict] = []
    with ParquetShardWriter(out_dir, "train", features, rows_per_file) as writer:
        for row in rows:
            writer.write(row)
            labels.append({k: row[k] for k in ("yaw", "pitch", "roll", "direction", "estimator")})
    (out_dir / PLOT_NAME).write_bytes(_hist_png(labels))
    dist = distribution(labels)
    summary = {"rows": writer.rows_written, "counts": dict(counts), "distribution": dist,
               "direction_thresholds": dict(thresholds), "convention": CONVENTION, "uses_standin_models": uses_standin}
    lines = [f"# {pretty_name}", ""]
    if uses_standin:
        lines += ["**Warning: built with a stand-in SPIGA (random weights): landmarks and both poses mean nothing. "
                  "It only checks the pipeline.**", ""]
    lines += [f"Source: {source_note}", "",
              "One row per face per estimator (`estimator`): `spiga` = SPIGA's own head pose; `pnp` = a "
              "perspective-n-point fit of SPIGA's 68 landmarks to SPIGA's mean 3D face (principal point at the "
              "face-box centre, focal 1.5 x the longer image side, then the line-of-sight rotation removed).", "",
              "## Columns", "", *SCHEMA.columns_markdown(), "",
              f"Angles: {CONVENTION}.", "",
              f"`direction`: `left`/`right` when |yaw| > {thresholds['yaw']} (sign as above), `up`/`down` when "
              f"|pitch| > {thresholds['pitch']}, else `front`; when both pass, the angle further past its "
              "threshold (relative) wins, ties to yaw.", "",
              "Splits: one split, `train` (every face; no rows held out).", "",
              "## Counts", "", "| what | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(counts.items())]
    lines += [f"| rows written | {writer.rows_written} |", "", "## Label distribution", "",
              f"![yaw and pitch histograms]({PLOT_NAME})", "", "| estimator | rows | yaw p5/p50/p95 | pitch p5/p50/p95 | directions |",
              "|---|---|---|---|---|"]
    def fmt(q: dict | None) -> str:
        return "-" if q is None else f"{q['p5']:.1f} / {q['p50']:.1f} / {q['p95']:.1f}"

    for est, b in dist.items():
        lines.append(f"| {est} | {b['rows']} | {fmt(b['yaw'])} | {fmt(b['pitch'])} | {b['direction']} |")
    lines += [""] + list(extra_lines or [])
    splits = {"train": writer.rows_written} if writer.rows_written else {}
    write_card(out_dir, pretty_name=pretty_name, features=features, splits=splits,
               split_bytes={"train": writer.num_bytes} if splits else None, license="other", source_datasets=[],
               task_categories=["image-to-image"], tags=["faces", "head-pose"], body_markdown="\n".join(lines))
    return summary


# ------------------------------------------------------------------------------------------- validation


def mae_block(truth: np.ndarray, estimate: np.ndarray) -> dict:
    """Mean absolute error (degrees, wrapped) per angle and overall (mean of the three) over rows where
    both are finite; ``count`` is that number of rows."""
    t, e = np.asarray(truth, dtype=np.float64).reshape(-1, 3), np.asarray(estimate, dtype=np.float64).reshape(-1, 3)
    ok = np.isfinite(t).all(axis=1) & np.isfinite(e).all(axis=1)
    if not ok.any():
        return {"count": 0, **{a: None for a in ANGLES}, "overall": None}
    d = angle_difference(t[ok], e[ok])
    per = {a: float(d[:, i].mean()) for i, a in enumerate(ANGLES)}
    return {"count": int(ok.sum()), **per, "overall": float(np.mean(list(per.values())))}


def spiga_on_boxes(annotator: Any, images: list[np.ndarray], boxes: list[np.ndarray],
                   batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """SPIGA (an :class:`~pipelines.faces.spiga.SpigaAnnotator`) on one box per RGB image, ``batch_size`` crops
    per forward: landmarks (N, 68, 2) image pixels and head pose (N, 6), SPIGA's convention."""
    from pipelines.faces.spiga import crop_face
    from pipelines.shards import to_tensor_batch

    lms, hps = [np.zeros((0, 68, 2))], [np.zeros((0, 6))]
    for s in range(0, len(images), max(1, batch_size)):
        cut = [crop_face(im, b) for im, b in zip(images[s:s + batch_size], boxes[s:s + batch_size], strict=True)]
        ldm, hp = annotator.predict(to_tensor_batch([c for c, _ in cut]), np.stack([cb for _, cb in cut]),
                                    np.stack(boxes[s:s + batch_size]))
        lms.append(ldm)
        hps.append(hp)
    return np.concatenate(lms), np.concatenate(hps)


def png_bytes(image_rgb: np.ndarray) -> dict:
    """An RGB uint8 array as an Image-column value (PNG bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image_rgb, dtype=np.uint8)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}
