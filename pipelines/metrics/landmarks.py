"""Landmark error: the normalised mean error (NME) used for 68-point faces."""
from __future__ import annotations

import numpy as np

# iBUG-68 outer eye corners (0-based): the usual inter-ocular normalisation.
LEFT_EYE_OUTER, RIGHT_EYE_OUTER = 36, 45


def interocular_distance(landmarks: np.ndarray) -> np.ndarray:
    """Distance between the outer eye corners of (N, 68, 2) landmarks: (N,)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.linalg.norm(lm[:, LEFT_EYE_OUTER] - lm[:, RIGHT_EYE_OUTER], axis=-1)


def nme(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-face NME: mean point-to-point distance over the target's inter-ocular distance.

    ``pred`` and ``target`` are (N, 68, 2) in the same pixel frame; returns (N,). A face whose
    inter-ocular distance is zero gets NaN (undefined), never a division warning.
    """
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"expected two (N, K, 2) arrays of one shape, got {pred.shape} and {target.shape}")
    err = np.linalg.norm(pred - target, axis=-1).mean(axis=-1)
    iod = interocular_distance(target)
    out = np.full(len(err), np.nan)
    np.divide(err, iod, out=out, where=iod > 0)
    return out


def summarize_nme(values: np.ndarray, failure_threshold: float = 0.08) -> dict:
    """Mean, median, 90th percentile and failure rate (NME above ``failure_threshold``) of per-face NME."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"count": 0, "mean": None, "median": None, "p90": None, "failure_rate": None,
                "failure_threshold": failure_threshold}
    return {"count": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "p90": float(np.percentile(v, 90)), "failure_rate": float((v > failure_threshold).mean()),
            "failure_threshold": failure_threshold}
