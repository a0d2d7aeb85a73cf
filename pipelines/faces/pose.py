"""Head-pose labels in one documented convention: PnP on 68 landmarks, SPIGA's output converted, x/y/scale, direction.

**Our convention** (the one of :mod:`pipelines.sources.sample_faces`, so its ground truth compares directly):
angles in degrees; camera frame x = image right, y = image down, z = away from the camera; at (0, 0, 0) the face
looks straight at the camera; the head rotation is ``R = Rz(roll) @ Ry(yaw) @ Rx(-pitch)`` acting on the face
model in camera axes (pitch applied first, then yaw, then roll, about fixed axes):

* ``yaw > 0``: the face turns toward **image-left** (the subject's own right); the nose tip moves left.
* ``pitch > 0``: the face looks **up**; the nose tip moves up.
* ``roll > 0``: the face tilts **clockwise** in the image; the top of the head moves to image-right.

The angles are relative to the camera's line of sight to the face (the pose a viewer sees, as AFLW2000-3D's
weak-perspective labels and SPIGA's crop-centred training poses are): :func:`pnp_pose` puts the principal
point at the face-box centre, so an off-centre face is not given the extra pitch/yaw of its viewing ray.
For AFLW2000-3D these are also its own signs (see :mod:`pipelines.sources.aflw2000`).
"""
from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

from pipelines.sources.sample_faces import _rotation as pose_rotation  # R = Rz(roll) Ry(yaw) Rx(-pitch)
from pipelines.sources.sample_faces import mean_face_3d

DIRECTIONS = ("left", "right", "up", "down", "front")
FOCAL_RATIO = 1.5  # focal length / longer image side (SPIGA's focal_ratio; the embedded renderer's too)
FLIP_YZ = np.diag([1.0, -1.0, -1.0])  # SPIGA's mean-face axes (x right, y up, z toward viewer) -> camera axes
# SPIGA's model3d (spiga.data.loaders.augmentors.modern_posit.load_world_shape) in terms of mean_face_3d():
# world = SPIGA_AXES @ m, i.e. world_x = m_z, world_y = -m_x, world_z = -m_y (checked by the tests).
SPIGA_AXES = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])

__all__ = ["DIRECTIONS", "pose_rotation", "rotation_to_pose", "face_model", "pnp_pose", "spiga_pose_to_ours",
           "ours_to_spiga_rotation", "position_scale", "direction"]


def rotation_to_pose(rot: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of a 3x3 camera-frame head rotation, in our convention (inverse of
    :func:`pose_rotation` for |yaw| < 90)."""
    r = np.asarray(rot, dtype=np.float64)
    yaw = np.degrees(np.arcsin(np.clip(-r[2, 0], -1.0, 1.0)))
    pitch = -np.degrees(np.arctan2(r[2, 1], r[2, 2]))
    roll = np.degrees(np.arctan2(r[1, 0], r[0, 0]))
    return float(yaw), float(pitch), float(roll)


def line_of_sight_rotation(translation: np.ndarray) -> np.ndarray:
    """The smallest rotation taking the optical axis (0, 0, 1) onto the direction of ``translation`` (camera
    frame): a face at zero pose relative to its line of sight has camera-frame rotation ``this @ I``."""
    t = np.asarray(translation, dtype=np.float64).reshape(3)
    t = t / np.linalg.norm(t)
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(z, t)
    s, c = float(np.linalg.norm(axis)), float(t @ z)
    if s < 1e-12:
        return np.eye(3)
    rvec = axis / s * np.arctan2(s, c)
    return cv2.Rodrigues(rvec.reshape(3, 1))[0]


def apparent_pose(rot: np.ndarray, translation: np.ndarray) -> tuple[float, float, float]:
    """Our (yaw, pitch, roll) of a camera-frame rotation ``rot`` of a head at ``translation``, relative to the
    line of sight to it (what a viewer sees; the convention of every label here)."""
    return rotation_to_pose(line_of_sight_rotation(translation).T @ np.asarray(rot, dtype=np.float64))


def camera_rotation(yaw: float, pitch: float, roll: float, translation: np.ndarray) -> np.ndarray:
    """Inverse of :func:`apparent_pose`: the camera-frame rotation of a head at ``translation`` whose pose
    relative to its line of sight is (yaw, pitch, roll)."""
    return line_of_sight_rotation(translation) @ pose_rotation(yaw, pitch, roll)


def face_model() -> np.ndarray:
    """SPIGA's mean 3D face (68, 3) in camera axes (x right, y down, z away), centred on its centroid."""
    obj = mean_face_3d() @ FLIP_YZ
    return obj - obj.mean(axis=0)


def _size(image_size: int | tuple[int, int]) -> tuple[float, float]:
    if isinstance(image_size, (int, np.integer)):
        return float(image_size), float(image_size)
    w, h = image_size
    return float(w), float(h)


def pnp_pose(landmarks68: np.ndarray, face_box: np.ndarray, image_size: int | tuple[int, int],
             principal_point: str = "box", focal_ratio: float = FOCAL_RATIO,
             line_of_sight: bool = True) -> tuple[float, float, float]:
    """Head pose (yaw, pitch, roll) in degrees, our convention, from 68 iBUG landmarks by perspective-n-point.

    Fits SPIGA's mean 3D face to the landmarks with ``cv2.solvePnP`` (EPnP start, then Levenberg-Marquardt).
    Camera: focal ``focal_ratio`` x the longer image side (``image_size``: ``(width, height)`` or one int);
    principal point at the centre of ``face_box`` ``[x, y, w, h]`` (default, see the module docstring) or,
    with ``principal_point="image"``, at the image centre. The fitted rotation is then taken relative to the
    line of sight to the fitted head centre (``line_of_sight=False``: the raw camera-frame rotation, which
    gives an off-centre face the pitch/yaw of its viewing ray when the principal point is the image centre;
    kept for the tests that show that bias).
    Returns NaNs when the landmarks are not finite or the fit fails.
    """
    pts = np.asarray(landmarks68, dtype=np.float64).reshape(-1, 2)
    if pts.shape != (68, 2):
        raise ValueError(f"expected 68 landmarks, got {pts.shape}")
    if not np.isfinite(pts).all():
        return (float("nan"),) * 3
    width, height = _size(image_size)
    if principal_point == "box":
        x, y, w, h = (float(v) for v in face_box)
        cx, cy = x + w / 2.0, y + h / 2.0
    elif principal_point == "image":
        cx, cy = width / 2.0, height / 2.0
    else:
        raise ValueError(f"principal_point {principal_point!r} is not 'box' or 'image'")
    f = focal_ratio * max(width, height)
    cam = np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])
    obj = face_model()
    ok, rvec, tvec = cv2.solvePnP(obj, pts, cam, None, flags=cv2.SOLVEPNP_EPNP)
    if not ok or tvec[2, 0] <= 0:  # EPnP can land behind the camera on bad points: start frontal instead
        rvec = np.zeros((3, 1))
        tvec = np.array([[0.0], [0.0], [f * 2.0]])
    ok, rvec, tvec = cv2.solvePnP(obj, pts, cam, None, rvec, tvec, useExtrinsicGuess=True,
                                  flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok or not np.isfinite(rvec).all():
        return (float("nan"),) * 3
    rot = cv2.Rodrigues(rvec)[0]
    return apparent_pose(rot, tvec.reshape(3)) if line_of_sight else rotation_to_pose(rot)


def _spiga_rotation(euler: np.ndarray) -> np.ndarray:
    """SPIGA's rotation matrices (N, 3, 3) of (N, 3) Euler angles, via its own maths (float64)."""
    import torch

    from pipelines.faces.spiga import euler_to_rotation

    return euler_to_rotation(torch.as_tensor(np.asarray(euler, dtype=np.float64))).double().numpy()


def spiga_pose_to_ours(headpose: np.ndarray) -> np.ndarray:
    """SPIGA's head pose (yaw, pitch, roll in its convention; extra columns such as its translation are
    ignored) converted to our convention: (3,) for one pose, (N, 3) for (N, >=3).

    Derived from the rotation maths, not fitted: SPIGA projects its world shape ``W`` as
    ``R_spiga(e) @ W`` (``euler_to_rotation``), and ``W = SPIGA_AXES @ m`` for the mean face ``m`` that our
    model uses as ``FLIP_YZ @ m``; so our rotation is ``R_spiga(e) @ SPIGA_AXES @ FLIP_YZ``, decomposed by
    :func:`rotation_to_pose`. To first order this is ``(-yaw, pitch, roll)``: SPIGA's positive yaw turns the
    face to image-right. Non-finite rows give NaN.
    """
    hp = np.asarray(headpose, dtype=np.float64)
    single = hp.ndim == 1
    hp = hp.reshape(1, -1) if single else hp
    if hp.ndim != 2 or hp.shape[1] < 3:
        raise ValueError(f"expected (N, >=3) yaw, pitch, roll, got {np.shape(headpose)}")
    out = np.full((len(hp), 3), np.nan)
    ok = np.isfinite(hp[:, :3]).all(axis=1)
    if ok.any():
        rots = _spiga_rotation(hp[ok, :3]) @ SPIGA_AXES @ FLIP_YZ
        out[ok] = [rotation_to_pose(r) for r in rots]
    return out[0] if single else out


def ours_to_spiga_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """The rotation SPIGA would apply to its world shape for a face at our (yaw, pitch, roll) (tests, rendering)."""
    return pose_rotation(yaw, pitch, roll) @ FLIP_YZ @ SPIGA_AXES.T


def position_scale(face_box: np.ndarray, width: int, height: int) -> tuple[float, float, float]:
    """``(x, y, scale)`` of a face box ``[x, y, w, h]`` in a ``width`` x ``height`` image.

    ``x``, ``y``: the box centre over the image width and height (0..1 inside the image);
    ``scale``: the box side ``max(w, h)`` (the side of the square SPIGA crops around) over the image's
    shorter side ``min(width, height)`` (1 = the largest square face that fits).
    """
    x, y, w, h = (float(v) for v in face_box)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return (x + w / 2.0) / width, (y + h / 2.0) / height, max(w, h) / min(width, height)


def direction(yaw: float, pitch: float, thresholds: Mapping[str, float]) -> str:
    """One of ``left, right, up, down, front`` from a pose in our convention.

    ``left`` / ``right``: ``yaw > thresholds['yaw']`` / ``yaw < -thresholds['yaw']`` (the face turned toward
    image-left / image-right, as seen by the viewer); ``up`` / ``down``: ``pitch > thresholds['pitch']`` /
    ``pitch < -thresholds['pitch']``; ``front`` otherwise (a value equal to its threshold is not past it).
    Precedence when both pass: the angle further past its threshold relative to it (``|yaw| / t_yaw`` vs
    ``|pitch| / t_pitch``) wins; a tie goes to yaw. NaN angles give ``front`` only if both are finite, else
    raise ``ValueError``.
    """
    t_yaw, t_pitch = float(thresholds["yaw"]), float(thresholds["pitch"])
    if t_yaw <= 0 or t_pitch <= 0:
        raise ValueError(f"thresholds must be > 0, got yaw {t_yaw}, pitch {t_pitch}")
    if not (np.isfinite(yaw) and np.isfinite(pitch)):
        raise ValueError(f"pose is not finite: yaw {yaw}, pitch {pitch}")
    over_yaw = abs(yaw) / t_yaw if abs(yaw) > t_yaw else 0.0
    over_pitch = abs(pitch) / t_pitch if abs(pitch) > t_pitch else 0.0
    if over_yaw == 0.0 and over_pitch == 0.0:
        return "front"
    if over_yaw >= over_pitch:
        return "left" if yaw > 0 else "right"
    return "up" if pitch > 0 else "down"
