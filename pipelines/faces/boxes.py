"""Face boxes: the FaceSynthetics rule (box from the sample's own landmarks) and box checks."""
from __future__ import annotations

import numpy as np


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
