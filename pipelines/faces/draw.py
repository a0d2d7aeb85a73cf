"""The "spiga_seg" conditioning image: iBUG-68 landmarks drawn as coloured lines on black.

:func:`draw_landmarks` draws it with OpenCV (anti-aliased, sub-pixel coordinates), about two orders of
magnitude faster than the original matplotlib figure, which :func:`draw_landmarks_matplotlib` keeps as
the benchmark baseline and as a cross-check of the style.

Landmarks are pixel coordinates of a ``size`` x ``size`` image, pixel centres at integer coordinates
(the convention of both OpenCV and matplotlib's ``imshow``).
"""
from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

NUM_LANDMARKS = 68
_SHIFT = 4  # fractional bits for cv2 sub-pixel coordinates (1/16 px)


class Group(NamedTuple):
    """One stroke of the drawing: index range, colour name and RGB, closed (and filled) or open."""

    name: str
    start: int
    stop: int
    color_name: str
    rgb: tuple[int, int, int]
    closed: bool


LIME, YELLOW, ORANGE = (0, 255, 0), (255, 255, 0), (255, 165, 0)
MAGENTA, CYAN, BLUE = (255, 0, 255), (0, 255, 255), (0, 0, 255)

# Drawing order matters: later groups paint over earlier ones (inner lips last, over the outer lips).
GROUPS: tuple[Group, ...] = (
    Group("jaw", 0, 17, "lime", LIME, False),
    Group("left_eyebrow", 17, 22, "yellow", YELLOW, False),
    Group("right_eyebrow", 22, 27, "yellow", YELLOW, False),
    Group("nose_bridge", 27, 31, "orange", ORANGE, False),
    Group("nose_base", 31, 36, "orange", ORANGE, False),
    Group("left_eye", 36, 42, "magenta", MAGENTA, True),
    Group("right_eye", 42, 48, "magenta", MAGENTA, True),
    Group("outer_lips", 48, 60, "cyan", CYAN, True),
    Group("inner_lips", 60, 68, "blue", BLUE, True),
)
COLORS: dict[str, tuple[int, int, int]] = {g.color_name: g.rgb for g in GROUPS}


def _check(landmarks: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"expected ({NUM_LANDMARKS}, 2) landmarks, got {lm.shape}")
    return lm


# cv2's anti-aliased fills add a fringe of about 0.7 px on each side of a polygon (its thick AA lines are
# worse: only odd widths + 1.5 px), so strokes are drawn as convex quads whose half-width is reduced by
# this much; measured mean stroke width is then the nominal one (4.00 px at width 4).
_AA_FRINGE = 0.7
_MITER_LIMIT = 4.0  # Agg's default (matplotlib's 'miter' join falls back to bevel beyond it)


def _fill_convex(canvas: np.ndarray, pts: np.ndarray, rgb: tuple[int, int, int]) -> None:
    cv2.fillConvexPoly(canvas, np.round(pts * (1 << _SHIFT)).astype(np.int32), rgb, lineType=cv2.LINE_AA, shift=_SHIFT)


def _stroke(canvas: np.ndarray, pts: np.ndarray, closed: bool, rgb: tuple[int, int, int], width: float) -> None:
    """A polyline of ``width`` px with butt caps and miter joins (matplotlib's patch style), anti-aliased."""
    if closed:
        pts = np.concatenate([pts, pts[:1]])
    seg = np.diff(pts, axis=0)
    length = np.linalg.norm(seg, axis=1)
    keep = length > 1e-6
    a, b, seg, length = pts[:-1][keep], pts[1:][keep], seg[keep], length[keep]
    if len(a) == 0:
        return
    h = max(width / 2 - _AA_FRINGE, 0.05)
    d = seg / length[:, None]
    n = np.stack([-d[:, 1], d[:, 0]], axis=1)
    for ai, bi, ni in zip(a, b, n * h, strict=True):
        _fill_convex(canvas, np.array([ai + ni, bi + ni, bi - ni, ai - ni]), rgb)
    # joins between consecutive segments (and between the last and first when closed)
    pairs = list(zip(range(len(d) - 1), range(1, len(d)), strict=True))
    if closed and len(d) > 2:
        pairs.append((len(d) - 1, 0))
    for i, j in pairs:
        d1, d2, v = d[i], d[j], b[i]
        turn = d1[0] * d2[1] - d1[1] * d2[0]
        if abs(turn) < 1e-9 and float(d1 @ d2) > 0:
            continue  # straight on: the quads meet exactly
        side = -np.sign(turn) if turn != 0 else 1.0  # outer side of the turn
        n1, n2 = side * n[i], side * n[j]
        p1, p2 = v + n1 * h, v + n2 * h
        bis = n1 + n2
        cos_half = np.linalg.norm(bis) / 2  # cos of half the angle between the normals
        if cos_half > 1 / _MITER_LIMIT:
            tip = v + bis / np.linalg.norm(bis) * (h / cos_half)
            _fill_convex(canvas, np.array([v, p1, tip, p2]), rgb)
        else:
            _fill_convex(canvas, np.array([v, p1, p2]), rgb)


def draw_landmarks(landmarks: np.ndarray, size: int = 512, line_width: int = 4) -> np.ndarray:
    """Draw the spiga_seg conditioning image with OpenCV: (size, size, 3) uint8 RGB.

    ``line_width`` is the stroke width at 512 px; it scales with ``size``. Closed groups are filled, then
    stroked, with their colour; open groups are stroked only. Strokes have butt caps and miter joins like
    the original matplotlib patches; anti-aliasing blends each colour with what is under it.
    """
    lm = _check(landmarks)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if line_width <= 0:
        raise ValueError(f"line_width must be > 0, got {line_width}")
    width = line_width * size / 512
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    fixed = np.round(lm * (1 << _SHIFT)).astype(np.int32)
    for g in GROUPS:
        if g.closed:
            cv2.fillPoly(canvas, [fixed[g.start:g.stop].reshape(-1, 1, 2)], g.rgb, lineType=cv2.LINE_AA, shift=_SHIFT)
        _stroke(canvas, lm[g.start:g.stop], g.closed, g.rgb, width)
    return canvas


def draw_landmarks_matplotlib(landmarks: np.ndarray, size: int = 512) -> np.ndarray:
    """The original implementation (matplotlib PathPatch figure), for benchmarks and cross-checks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MplPath

    lm = _check(landmarks)
    # Agg explicitly, without pyplot: no global backend switch, no figure registry to leak.
    # tight_layout as a figure setting, as in the original: applied at draw time, after axis('off').
    fig = Figure(figsize=(size / 72, size / 72), dpi=72, tight_layout={"pad": 0})
    canvas = FigureCanvasAgg(fig)
    try:
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(np.zeros((size, size, 3)))
        for g in GROUPS:
            pts = lm[g.start:g.stop]
            verts = [tuple(p) for p in pts]
            codes = [MplPath.MOVETO] + [MplPath.LINETO] * (len(pts) - 1)
            if g.closed:
                verts.append(tuple(pts[0]))
                codes.append(MplPath.CLOSEPOLY)
                facecolor = g.color_name
            else:
                facecolor = (0, 0, 0, 0)
            ax.add_patch(PathPatch(MplPath(verts, codes), edgecolor=g.color_name, facecolor=facecolor, lw=4))
        ax.axis("off")
        canvas.draw()
        buf, (w, h) = canvas.print_to_buffer()
        rgba = np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 4)
        return rgba[..., :3].copy()
    finally:
        fig.clear()
