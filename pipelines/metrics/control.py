"""Control fidelity: does a generated face follow its conditioning landmarks and head pose?

For every generated image we know what was asked: the 68 conditioning landmarks (drawn into the control
image) and the head pose of the face they came from (SPIGA's ``headpose`` column of the dataset). We
measure what we got:

* **landmark NME** - SPIGA, through the very annotator the dataset was built with
  (:class:`~pipelines.faces.spiga.SpigaAnnotator`, :func:`~pipelines.faces.spiga.crop_face`), re-detects
  68 landmarks on the generated image; their normalised mean error against the conditioning landmarks
  (inter-ocular distance of the condition) is :func:`pipelines.metrics.landmarks.nme`, summarised by
  :func:`pipelines.metrics.landmarks.summarize_nme`.
* **face detection rate** - the share of generated images in which an independent face detector (dlib's
  HOG frontal detector) finds a face overlapping the conditioning face box (IoU >= ``min_iou``).
* **head-pose error** - SPIGA's yaw/pitch/roll on the generated image against the condition's, both in
  SPIGA's convention: per-angle absolute differences (wrapped to [0, 180]) and the geodesic angle of the
  relative rotation (convention-safe: it does not depend on how the rotation is split into three angles).

Why SPIGA looks at a box made from the **condition** landmarks, not from a detection on the generated
image: the question is "did the model put the face where it was asked, in the shape it was asked", so we
look where it was asked, with the same box rule the dataset used (min/max of the landmarks grown by
``box_margin``; the 68 points span the same box as FaceSynthetics' 70, whose 2 extra are the pupils inside
the eyes). A face generated elsewhere then shows up as a large NME instead of being silently re-centred by
a detector, and every image gets an NME (no selection bias toward the easy ones). Whether there is a face
at all is the detector's separate answer, the face detection rate.

The images must be in the frame of the condition landmarks: if the generator's output is not the
condition's size (512 px), scale the landmarks with :func:`scale_landmarks` (or resize the images).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from pipelines.faces.boxes import face_box_from_landmarks
from pipelines.faces.spiga import NUM_LANDMARKS, crop_face, euler_to_rotation
from pipelines.metrics.landmarks import nme, summarize_nme

DETECTORS = ("dlib_hog", "none")
ANGLES = ("yaw", "pitch", "roll")
REFERENCE_SIZE = 512  # the condition frame: FaceSynthetics images and the dataset's landmarks are 512 px

Detection = tuple[np.ndarray, float]  # ([x, y, w, h] float64, score)


# ----------------------------------------------------------------------------------------------------------
# Face detectors


@runtime_checkable
class FaceDetector(Protocol):
    """Finds faces in an RGB uint8 image: a list of ``([x, y, w, h], score)``, or ``None`` = not measured."""

    name: str

    def detect(self, image_rgb: np.ndarray) -> list[Detection] | None: ...


class DlibHogDetector:
    """dlib's HOG + linear SVM frontal face detector (``dlib.get_frontal_face_detector``; weights ship in dlib).

    Keeps detections with SVM score >= ``threshold``: at dlib's own default (0) the detector fires on
    face-like patches; 0.5 is the project's default (``evaluate.face_detector_threshold``). ``upsample``
    is dlib's pyramid upsampling count: 0 finds faces down to about 80 px, each step halves that and costs
    about 4x the time; generated 512 px faces are large, so 0 is the default.
    """

    name = "dlib_hog"

    def __init__(self, threshold: float = 0.5, upsample: int = 0):
        import dlib

        self.threshold = float(threshold)
        self.upsample = int(upsample)
        self._detector = dlib.get_frontal_face_detector()

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        image = _check_image(image_rgb)
        rects, scores, _ = self._detector.run(image, self.upsample, self.threshold)
        out = []
        for r, s in zip(rects, scores, strict=True):
            if s >= self.threshold:
                out.append((np.array([r.left(), r.top(), r.width(), r.height()], dtype=np.float64), float(s)))
        return sorted(out, key=lambda d: -d[1])


class NoDetector:
    """``face_detector: none``: detection is not measured (``detect`` returns ``None``)."""

    name = "none"

    def detect(self, image_rgb: np.ndarray) -> None:
        return None


def make_detector(name: str, threshold: float = 0.5, upsample: int = 0) -> FaceDetector:
    """The detector named by ``evaluate.face_detector``: ``dlib_hog`` or ``none`` (``upsample``: dlib's)."""
    if name == "dlib_hog":
        return DlibHogDetector(threshold, upsample)
    if name == "none":
        return NoDetector()
    raise ValueError(f"face_detector {name!r} is not one of {', '.join(DETECTORS)}")


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two ``[x, y, w, h]`` boxes (0 when either is empty)."""
    ax, ay, aw, ah = (float(v) for v in a)
    bx, by, bw, bh = (float(v) for v in b)
    if aw <= 0 or ah <= 0 or bw <= 0 or bh <= 0:
        return 0.0
    ix = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / (aw * ah + bw * bh - inter)


def _check_image(image_rgb: np.ndarray) -> np.ndarray:
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    return np.ascontiguousarray(image)


# ----------------------------------------------------------------------------------------------------------
# Head pose


def _poses(pose: np.ndarray, what: str) -> np.ndarray:
    p = np.asarray(pose, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 3:
        raise ValueError(f"{what}: expected (N, 3) yaw, pitch, roll (or SPIGA's (N, 6) headpose), got {p.shape}")
    return p[:, :3]


def _nanmean(v: np.ndarray) -> float | None:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def _nanmedian(v: np.ndarray) -> float | None:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else None


def angle_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|a - b|`` in degrees, wrapped to [0, 180] (179 vs -179 is 2)."""
    d = np.mod(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), 360.0)
    return np.minimum(d, 360.0 - d)


def pose_difference(pose_a: np.ndarray, pose_b: np.ndarray) -> dict:
    """Per-angle absolute head-pose differences in degrees, with wrap-around.

    ``pose_a``, ``pose_b``: (N, 3) yaw, pitch, roll (extra columns, e.g. SPIGA's translation, are ignored).
    Returns per-image arrays ``yaw``, ``pitch``, ``roll`` (N,) and ``mean_abs`` (N,) (the mean of the three),
    and ``mean``: ``{yaw, pitch, roll, mean_abs}`` floats over the images where both poses are finite
    (``None`` when there are none).
    """
    a, b = _poses(pose_a, "pose_a"), _poses(pose_b, "pose_b")
    if a.shape != b.shape:
        raise ValueError(f"pose shapes differ: {a.shape} vs {b.shape}")
    d = angle_difference(a, b)
    per = {name: d[:, i] for i, name in enumerate(ANGLES)}
    per["mean_abs"] = d.mean(axis=1)
    return {**per, "mean": {k: _nanmean(v) for k, v in per.items()}}


def geodesic_angle(pose_a: np.ndarray, pose_b: np.ndarray) -> np.ndarray:
    """The angle (degrees, [0, 180]) of the rotation between two head rotations, per row: (N,).

    Rotations are built from yaw, pitch, roll with SPIGA's own :func:`~pipelines.faces.spiga.euler_to_rotation`;
    the angle of ``R_a^T R_b`` is taken as ``atan2(sin, cos)`` (accurate near 0 and 180, unlike ``arccos``).
    Rows with a non-finite angle give NaN.
    """
    import torch

    a, b = _poses(pose_a, "pose_a"), _poses(pose_b, "pose_b")
    if a.shape != b.shape:
        raise ValueError(f"pose shapes differ: {a.shape} vs {b.shape}")
    out = np.full(len(a), np.nan)
    ok = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    if not ok.any():
        return out
    ra = euler_to_rotation(torch.from_numpy(a[ok])).double().numpy()
    rb = euler_to_rotation(torch.from_numpy(b[ok])).double().numpy()
    rel = np.einsum("nji,njk->nik", ra, rb)  # R_a^T R_b
    cos = (np.trace(rel, axis1=1, axis2=2) - 1.0) / 2.0
    axis = np.stack([rel[:, 2, 1] - rel[:, 1, 2], rel[:, 0, 2] - rel[:, 2, 0], rel[:, 1, 0] - rel[:, 0, 1]], axis=1)
    sin = np.linalg.norm(axis, axis=1) / 2.0
    out[ok] = np.degrees(np.arctan2(sin, cos))
    return out


# ----------------------------------------------------------------------------------------------------------
# Landmarks between frames


def scale_landmarks(landmarks: np.ndarray, from_size: int | Sequence[int], to_size: int | Sequence[int]) -> np.ndarray:
    """Landmarks ``(..., 2)`` from a ``from_size`` image to a ``to_size`` one (``int`` = square, or ``(w, h)``).

    Pure scaling ``x * to / from`` (continuous coordinates with the origin at the image corner, as SPIGA's
    crop <-> image mapping uses). Under the pixel-centre convention of ``cv2.resize`` the points would also
    shift by ``0.5 * (to / from - 1)`` px: 0.25 px for 512 -> 256, i.e. an NME of 0.0025 at an inter-ocular
    distance of 100 px; the condition and SPIGA's output share this function's convention, so it cancels.
    """
    fw, fh = (from_size, from_size) if np.isscalar(from_size) else from_size
    tw, th = (to_size, to_size) if np.isscalar(to_size) else to_size
    if min(fw, fh, tw, th) <= 0:
        raise ValueError(f"sizes must be positive, got {from_size} -> {to_size}")
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape[-1] != 2:
        raise ValueError(f"expected (..., 2) landmarks, got {lm.shape}")
    return lm * np.array([tw / fw, th / fh])


# ----------------------------------------------------------------------------------------------------------
# Control fidelity


def condition_box(landmarks: np.ndarray, image_shape: tuple[int, ...], box_margin: float = 5.0,
                  reference_size: int = REFERENCE_SIZE) -> np.ndarray:
    """The face box of one condition: the dataset's rule (min/max of the landmarks grown by ``box_margin``),
    with the margin (pixels of the 512 px condition frame) scaled to the image's size."""
    margin = box_margin * max(image_shape[0], image_shape[1]) / reference_size
    return face_box_from_landmarks(landmarks, margin=margin)


def control_fidelity(generated: Sequence[np.ndarray], condition_landmarks: np.ndarray, condition_pose: np.ndarray,
                     annotator, detector: FaceDetector, box_margin: float = 5.0, batch_size: int = 16,
                     nme_failure_threshold: float = 0.08, min_iou: float = 0.3,
                     reference_size: int = REFERENCE_SIZE) -> dict:
    """Landmark NME, face detection rate and head-pose error of generated faces against their conditions.

    * ``generated``: N RGB uint8 images (HxWx3);
    * ``condition_landmarks``: (N, 68, 2) the conditioning landmarks **in each generated image's pixel frame**
      (see :func:`scale_landmarks`);
    * ``condition_pose``: (N, 3) yaw, pitch, roll of the condition in SPIGA's convention (the dataset's
      ``headpose[:3]``; an (N, 6) headpose is accepted);
    * ``annotator``: a :class:`~pipelines.faces.spiga.SpigaAnnotator` (anything with its ``predict``);
    * ``detector``: a :class:`FaceDetector` (:class:`NoDetector`: the rate is ``None``).

    SPIGA runs on the box of the condition landmarks (see the module docstring for why), ``batch_size``
    crops per forward. Returns ``{"summary": {...}, "per_image": {...}}``:

    * ``summary``: ``count``; ``landmark_nme`` (``summarize_nme``); ``face_detection_rate`` (share of images
      with a detection of IoU >= ``min_iou`` with the condition box, or ``None``); ``pose_error_deg``
      ``{yaw, pitch, roll, mean_abs, geodesic_mean, geodesic_median}``; ``spiga_nonfinite`` (images where
      SPIGA gave NaN/inf: their NME and pose errors are NaN and left out of the means); ``min_iou``;
      ``face_detector``;
    * ``per_image``: ``nme`` (N,), ``face_found`` (N,) bool or ``None``, ``detection_iou`` (N,) best IoU
      (0 without detection; ``None`` when not measured), ``pose_abs_diff`` (N, 3) yaw/pitch/roll,
      ``geodesic_deg`` (N,), ``landmarks`` (N, 68, 2) and ``headpose`` (N, 6): SPIGA's outputs, ``boxes`` (N, 4).
    """
    from pipelines.shards import to_tensor_batch

    n = len(generated)
    cond = np.asarray(condition_landmarks, dtype=np.float64)
    if cond.shape != (n, NUM_LANDMARKS, 2):
        raise ValueError(f"expected condition landmarks ({n}, {NUM_LANDMARKS}, 2) for {n} images, got {cond.shape}")
    pose_c = _poses(condition_pose, "condition_pose")
    if len(pose_c) != n:
        raise ValueError(f"{len(pose_c)} condition poses for {n} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    images = [_check_image(im) for im in generated]
    boxes = np.stack([condition_box(cond[i], images[i].shape, box_margin, reference_size) for i in range(n)]) \
        if n else np.zeros((0, 4))

    pred_ldm = np.full((n, NUM_LANDMARKS, 2), np.nan)
    pred_pose = np.full((n, 6), np.nan)
    for start in range(0, n, batch_size):
        rows = range(start, min(start + batch_size, n))
        cut = [crop_face(images[i], boxes[i]) for i in rows]
        ldm, hp = annotator.predict(to_tensor_batch([c[0] for c in cut]), np.stack([c[1] for c in cut]), boxes[list(rows)])
        pred_ldm[start:rows.stop] = ldm
        pred_pose[start:rows.stop, :np.shape(hp)[1]] = hp

    finite = np.isfinite(pred_ldm).all(axis=(1, 2)) & np.isfinite(pred_pose[:, :3]).all(axis=1)
    pred_ldm[~finite] = np.nan
    pred_pose[~finite] = np.nan
    per_nme = nme(pred_ldm, cond) if n else np.zeros(0)
    diff = pose_difference(pred_pose, pose_c)
    geo = geodesic_angle(pred_pose, pose_c)

    found = iou = None
    if n:
        dets = [detector.detect(im) for im in images]
        if all(d is not None for d in dets):
            iou = np.array([max((box_iou(b, boxes[i]) for b, _ in d), default=0.0) for i, d in enumerate(dets)])
            found = iou >= min_iou
        elif any(d is not None for d in dets):
            raise ValueError("the detector measured some images and not others")
    elif not isinstance(detector, NoDetector):
        found = iou = np.zeros(0)

    summary = {
        "count": n,
        "landmark_nme": summarize_nme(per_nme, nme_failure_threshold),
        "face_detection_rate": (float(found.mean()) if found is not None and found.size else None),
        "face_detector": getattr(detector, "name", type(detector).__name__),
        "min_iou": min_iou,
        "pose_error_deg": {**{k: diff["mean"][k] for k in (*ANGLES, "mean_abs")},
                           "geodesic_mean": _nanmean(geo), "geodesic_median": _nanmedian(geo)},
        "spiga_nonfinite": int((~finite).sum()),
    }
    per_image = {
        "nme": per_nme, "face_found": found, "detection_iou": iou,
        "pose_abs_diff": np.stack([diff[k] for k in ANGLES], axis=1) if n else np.zeros((0, 3)),
        "geodesic_deg": geo, "landmarks": pred_ldm, "headpose": pred_pose, "boxes": boxes,
    }
    return {"summary": summary, "per_image": per_image}
