"""The spiga_seg drawing: known pixels, known colours, stroke width, and agreement with matplotlib."""
import numpy as np
import pytest

from pipelines.faces.draw import COLORS, GROUPS, draw_landmarks, draw_landmarks_matplotlib

PALETTE = np.array([(0, 0, 0)] + list(COLORS.values()), dtype=np.float64)


def separated_landmarks() -> np.ndarray:
    """68 points whose groups never touch: jaw on y=100, brows/nose apart, eyes and lips as polygons."""
    lm = np.zeros((68, 2))
    lm[0:17] = np.stack([np.linspace(50, 450, 17), np.full(17, 100.0)], axis=1)  # jaw: a horizontal line
    lm[17:22] = [(60, 160), (80, 150), (100, 147), (120, 150), (140, 160)]  # left brow
    lm[22:27] = [(370, 160), (390, 150), (410, 147), (430, 150), (450, 160)]  # right brow
    lm[27:31] = [(256, 150), (256, 170), (256, 190), (256, 210)]  # nose bridge: vertical
    lm[31:36] = [(226, 240), (241, 246), (256, 250), (271, 246), (286, 240)]  # nose base
    for start, cx in ((36, 140), (42, 372)):  # eyes: hexagons 80 px wide, 40 px tall
        lm[start:start + 6] = [(cx - 40, 300), (cx - 20, 280), (cx + 20, 280), (cx + 40, 300), (cx + 20, 320),
                               (cx - 20, 320)]
    a = np.linspace(np.pi, -np.pi, 12, endpoint=False)
    lm[48:60] = np.stack([256 + 90 * np.cos(a), 420 - 45 * np.sin(a)], axis=1)  # outer lips
    b = np.linspace(np.pi, -np.pi, 8, endpoint=False)
    lm[60:68] = np.stack([256 + 50 * np.cos(b), 420 - 18 * np.sin(b)], axis=1)  # inner lips
    return lm


def face_landmarks(size: int = 512) -> np.ndarray:
    """A realistic frontal iBUG-68 layout (U-shaped jaw, arched brows, almond eyes, lips)."""
    t = np.linspace(np.pi, 0, 17)
    jaw = np.stack([256 - 170 * np.cos(t), 230 + 190 * np.sin(t)], axis=1)
    brows = [(cx - 50 + 25 * i, 165 - 12 * np.sin(np.pi * i / 4)) for cx in (180, 332) for i in range(5)]
    nose = [(256, 195 + 22 * i) for i in range(4)] + [(256 + 20 * (i - 2), 300 + 6 * (2 - abs(i - 2))) for i in range(5)]
    eyes = [p for cx in (190, 322) for p in ((cx - 35, 215), (cx - 15, 200), (cx + 15, 200), (cx + 35, 215),
                                             (cx + 15, 228), (cx - 15, 228))]
    a = np.linspace(np.pi, -np.pi, 12, endpoint=False)
    b = np.linspace(np.pi, -np.pi, 8, endpoint=False)
    lips = [(256 + 60 * np.cos(x), 360 - 28 * np.sin(x)) for x in a] + [(256 + 38 * np.cos(x), 360 - 10 * np.sin(x)) for x in b]
    lm = np.concatenate([jaw, np.array(brows), np.array(nose), np.array(eyes), np.array(lips)])
    assert lm.shape == (68, 2)
    return lm * size / 512


def labels(img: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour per pixel (0 black, then COLORS in order)."""
    d = ((img.astype(np.float64)[..., None, :] - PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


@pytest.fixture(scope="module")
def drawing() -> np.ndarray:
    return draw_landmarks(separated_landmarks())


def test_shape_dtype_and_background(drawing):
    assert drawing.shape == (512, 512, 3) and drawing.dtype == np.uint8
    for y, x in ((0, 0), (511, 511), (0, 511), (511, 0), (250, 20)):
        assert tuple(drawing[y, x]) == (0, 0, 0)


def test_known_pixels(drawing):
    # the jaw is a horizontal line at y=100: midpoint of the segment 200..225 (points 6 and 7)
    assert tuple(drawing[100, 212]) == (0, 255, 0)
    assert tuple(drawing[150, 256 - 0]) != (0, 0, 0)  # nose bridge top reaches y=150
    assert tuple(drawing[180, 256]) == (255, 165, 0)  # orange nose bridge
    assert tuple(drawing[147, 100]) == (255, 255, 0)  # yellow brow, on its vertex
    assert tuple(drawing[300, 140]) == (255, 0, 255)  # inside the filled left eye
    assert tuple(drawing[300, 372]) == (255, 0, 255)  # inside the filled right eye
    assert tuple(drawing[420, 256]) == (0, 0, 255)  # inner lips, drawn over the outer (cyan) fill
    assert tuple(drawing[390, 256]) == (0, 255, 255)  # between the inner and outer lip contours
    assert tuple(drawing[60, 256]) == (0, 0, 0)  # off every stroke


def test_antialiasing_blends_only_with_black(drawing):
    """Groups do not overlap (except inner over outer lips): each pixel is t * one colour, t in [0, 1]."""
    img = drawing.astype(np.float64)
    lips = np.zeros(img.shape[:2], bool)
    lips[360:480, 150:362] = True
    best = np.full(img.shape[:2], np.inf)
    for c in COLORS.values():
        c = np.asarray(c, np.float64)
        t = np.clip((img @ c) / (c @ c), 0, 1)
        best = np.minimum(best, np.linalg.norm(img - t[..., None] * c, axis=-1))
    assert best[~lips].max() <= 3.0  # uint8 rounding of cv2's fixed-point blend only
    grey = ~lips & (img.max(-1) > 0) & (img.max(-1) < 255)
    assert grey.sum() > 100  # there is anti-aliasing


def test_line_width_is_about_4px_at_512(drawing):
    profile = drawing[:, 212, 1].astype(np.float64) / 255  # across the jaw line, away from other groups
    width = profile[60:140].sum()
    assert 3.5 <= width <= 4.5, profile[90:110]
    # sub-pixel position: a line at y=100.5 is still ~4 px wide, centred between rows 100 and 101
    lm = separated_landmarks()
    lm[0:17, 1] = 100.5
    p = draw_landmarks(lm)[:, 212, 1].astype(np.float64) / 255
    assert 3.5 <= p[60:140].sum() <= 4.5
    centre = (p[60:140] * np.arange(60, 140)).sum() / p[60:140].sum()
    assert centre == pytest.approx(100.5, abs=0.2)


def test_line_width_scales_with_size():
    lm = separated_landmarks() / 2
    small = draw_landmarks(lm, size=256)
    assert small.shape == (256, 256, 3)
    assert 1.5 <= small[20:80, 106, 1].sum() / 255 <= 2.5  # 4 px at 512 -> 2 px at 256
    wide = draw_landmarks(separated_landmarks(), line_width=8)
    assert 7.5 <= wide[60:140, 212, 1].sum() / 255 <= 8.5


def test_groups_table_matches_the_original_style():
    assert [(g.start, g.stop, g.color_name, g.closed) for g in GROUPS] == [
        (0, 17, "lime", False), (17, 22, "yellow", False), (22, 27, "yellow", False), (27, 31, "orange", False),
        (31, 36, "orange", False), (36, 42, "magenta", True), (42, 48, "magenta", True), (48, 60, "cyan", True),
        (60, 68, "blue", True)]


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        draw_landmarks(np.zeros((70, 2)))


def test_agrees_with_matplotlib():
    lm = face_landmarks()
    ours, original = labels(draw_landmarks(lm)), labels(draw_landmarks_matplotlib(lm))
    assert draw_landmarks_matplotlib(lm).shape == (512, 512, 3)
    ious = {}
    for k, name in enumerate(COLORS, start=1):
        a, b = ours == k, original == k
        ious[name] = (a & b).sum() / (a | b).sum()
    assert min(ious.values()) >= 0.7, ious
    assert ((ours == 0) == (original == 0)).mean() > 0.98
