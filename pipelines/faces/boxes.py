"""Face boxes: the FaceSynthetics rule (box from the sample's own landmarks), box checks, and the one box
convention every dataset stores.

Every dataset's box columns (FaceSynthetics ``face_box``, the head-pose sets' ``face_box``, COCO humans'
``face_boxes``) hold :data:`BOX_CONVENTION`: ``[x1, y1, x2, y2]`` pixels, COCO's and torchvision's ``xyxy``.
Inside the pipeline SPIGA's crops and dlib's detections work in ``[x, y, w, h]`` (the annotate shards keep
that); builders convert with :func:`xywh_to_xyxy` when they write a row.
"""
from __future__ import annotations

import numpy as np

#: The box convention of every dataset's box columns (the cards quote it)
BOX_CONVENTION = ("`[x1, y1, x2, y2]` in pixels of the row's image: top-left then bottom-right corner, x to the "
                  "right, y down (COCO's and torchvision's `xyxy`; width = x2 - x1)")


def xywh_to_xyxy(box: np.ndarray | list[float]) -> np.ndarray:
    """``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` (any leading shape, float64)."""
    b = np.asarray(box, dtype=np.float64)
    if b.shape[-1:] != (4,):
        raise ValueError(f"a box has 4 values, got shape {b.shape}")
    return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)


def xyxy_to_xywh(box: np.ndarray | list[float]) -> np.ndarray:
    """``[x1, y1, x2, y2]`` -> ``[x, y, w, h]`` (any leading shape, float64); the inverse of :func:`xywh_to_xyxy`."""
    b = np.asarray(box, dtype=np.float64)
    if b.shape[-1:] != (4,):
        raise ValueError(f"a box has 4 values, got shape {b.shape}")
    return np.concatenate([b[..., :2], b[..., 2:] - b[..., :2]], axis=-1)


def face_box_from_landmarks(landmarks: np.ndarray, margin: float = 5.0) -> np.ndarray:
    """``[x, y, w, h]`` from the min/max of all points, grown by ``margin`` on every side.

    The original build did ``x -= 5; y -= 5; w += 10; h += 10`` on the min/max box.
    """
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(pts).all():
        raise ValueError("landmarks hold NaN or inf")
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    return np.array([x0 - margin, y0 - margin, (x1 - x0) + 2 * margin, (y1 - y0) + 2 * margin], dtype=np.float64)


def box_inside_fraction(box: np.ndarray, width: int, height: int) -> float:
    """Share of the ``[x, y, w, h]`` box's area that lies inside a ``width`` x ``height`` image."""
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        return 0.0
    ix = max(0.0, min(x + w, width) - max(x, 0.0))
    iy = max(0.0, min(y + h, height) - max(y, 0.0))
    return ix * iy / (w * h)
