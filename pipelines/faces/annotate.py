"""SPIGA annotation of FaceSynthetics samples as a sharded map: the per-item load and the batch function.

Used by the annotate stage and by the benchmark, so both measure the same work.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.faces.boxes import box_inside_fraction, face_box_from_landmarks
from pipelines.faces.spiga import SpigaAnnotator, crop_face
from pipelines.shards import Failure, to_tensor_batch
from pipelines.sources.facesynthetics import (
    BOX_OFF_IMAGE,
    FaceSample,
    SampleError,
    read_image,
    read_landmarks,
)

NONFINITE_OUTPUT = "nonfinite_output"

ANNOTATION_SCHEMA = pa.schema([
    pa.field("landmarks", pa.list_(pa.list_(pa.float32()))),  # 68 x 2, image pixels
    pa.field("headpose", pa.list_(pa.float32())),  # yaw, pitch, roll (deg, SPIGA convention), tx, ty, tz
    pa.field("face_box", pa.list_(pa.float32())),  # x, y, w, h
    pa.field("source_landmarks", pa.list_(pa.list_(pa.float32()))),  # 70 x 2, the sample's own
])


def load_face(sample: FaceSample, image_size: int, box_margin: float, min_box_inside: float) -> dict | Failure:
    """Read one sample and cut SPIGA's crop (runs in DataLoader workers; bad samples become Failures).

    The box is the original rule: the sample's own 70 landmarks' min/max grown by ``box_margin``; a box
    with less than ``min_box_inside`` of its area inside the image is skipped as ``box_off_image``.
    """
    try:
        image = read_image(sample.image_path, size=image_size)
        source = read_landmarks(sample.landmarks_path)
    except SampleError as exc:
        return Failure(exc.reason, exc.detail)
    box = face_box_from_landmarks(source, margin=box_margin)
    inside = box_inside_fraction(box, image.shape[1], image.shape[0])
    if inside < min_box_inside:
        return Failure(BOX_OFF_IMAGE, f"{inside:.2f} of the box inside the image (< {min_box_inside})")
    crop, crop_box = crop_face(image, box)
    return {"crop": crop, "crop_box": crop_box, "face_box": box, "source_landmarks": source}


def face_inputs(sample: FaceSample) -> list[Path]:
    """The files :func:`load_face` reads: a change in one makes the sample's shard again."""
    return [sample.image_path, sample.landmarks_path]


def spiga_batch_fn(annotator: SpigaAnnotator) -> Callable[[list[dict]], list[dict | Failure]]:
    """The batch function for :class:`~pipelines.shards.ShardedMap`: one SPIGA forward per batch."""

    def infer(batch: list[dict]) -> list[dict | Failure]:
        crops = to_tensor_batch([s["crop"] for s in batch])
        landmarks, pose = annotator.predict(crops, np.stack([s["crop_box"] for s in batch]),
                                            np.stack([s["face_box"] for s in batch]))
        out: list[dict | Failure] = []
        for s, ldm, hp in zip(batch, landmarks, pose, strict=True):
            if not (np.isfinite(ldm).all() and np.isfinite(hp).all()):
                out.append(Failure(NONFINITE_OUTPUT, "SPIGA returned NaN or inf"))
                continue
            out.append({"landmarks": ldm.astype(np.float32).tolist(), "headpose": hp.astype(np.float32).tolist(),
                        "face_box": np.asarray(s["face_box"], dtype=np.float32).tolist(),
                        "source_landmarks": np.asarray(s["source_landmarks"], dtype=np.float32).tolist()})
        return out

    return infer
