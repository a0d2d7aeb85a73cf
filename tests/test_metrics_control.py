"""Control fidelity metrics: known answers for NME, pose differences, detection and the control_fidelity plumbing."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipelines.faces import spiga as S
from pipelines.faces.boxes import face_box_from_landmarks
from pipelines.metrics import control as C
from pipelines.metrics.landmarks import interocular_distance, nme, summarize_nme
from pipelines.sources.sample_faces import project_face, render_face
from pipelines.standins.spiga import build_spiga_standin

# (yaw, pitch, roll, centre, scale) of the rendered test faces (sample_faces' convention; only the images matter)
POSES = [(0.0, 0.0, 0.0, (256.0, 256.0), 0.5), (20.0, -10.0, 5.0, (240.0, 270.0), 0.45),
         (-30.0, 12.0, -8.0, (270.0, 250.0), 0.55)]


@pytest.fixture(scope="module")
def faces():
    """Rendered faces: (images (list of 512x512x3 uint8), 70-point landmarks (N, 70, 2))."""
    rng = np.random.default_rng(0)
    pts = [project_face(y, p, r, c, s, 512) for y, p, r, c, s in POSES]
    return [render_face(p, 512, rng)[0] for p in pts], np.stack(pts)


def _landmarks(n=3, seed=0):
    return np.stack([project_face(*np.random.default_rng(seed + i).uniform(-20, 20, 3), (256, 256), 0.5)[:68]
                     for i in range(n)])


# ----------------------------------------------------------------------------------------------------------
# NME (pipelines.metrics.landmarks, as used here)


def test_nme_zero_for_identical_and_exact_for_a_known_shift():
    target = _landmarks()
    assert np.array_equal(nme(target, target), np.zeros(3))
    # outer eye corners 150 px apart, every point shifted by (3, 4): error 5 px -> 5 / 150
    t = np.zeros((1, 68, 2))
    t[0, :, 0] = np.linspace(0, 200, 68)
    t[0, 36], t[0, 45] = (100.0, 200.0), (250.0, 200.0)
    assert interocular_distance(t)[0] == 150.0
    assert nme(t + (3.0, 4.0), t)[0] == pytest.approx(5 / 150, abs=1e-15)
    shifted = target + (3.0, 4.0)
    assert np.allclose(nme(shifted, target), 5 / interocular_distance(target), rtol=1e-12)


@pytest.mark.parametrize("k", [0.5, 2.0, 1024 / 512])
def test_nme_invariant_to_scaling_both_sets(k):
    target = _landmarks()
    pred = target + np.random.default_rng(1).normal(0, 3, target.shape)
    ref = nme(pred, target)
    scaled = nme(C.scale_landmarks(pred, 512, 512 * k), C.scale_landmarks(target, 512, 512 * k))
    assert np.allclose(scaled, ref, rtol=1e-12)


def test_summarize_nme_failure_rate_and_nan():
    s = summarize_nme(np.array([0.01, 0.05, 0.09, np.nan]), 0.08)
    assert s["count"] == 3 and s["failure_rate"] == pytest.approx(1 / 3) and s["mean"] == pytest.approx(0.05)


def test_scale_landmarks():
    lm = np.array([[[512.0, 256.0], [0.0, 100.0]]])
    assert np.allclose(C.scale_landmarks(lm, 512, 256), lm / 2)
    assert np.allclose(C.scale_landmarks(lm, (512, 512), (1024, 256)), lm * [2.0, 0.5])
    assert np.allclose(C.scale_landmarks(C.scale_landmarks(lm, 512, 768), 768, 512), lm)
    with pytest.raises(ValueError):
        C.scale_landmarks(lm, 0, 256)
    with pytest.raises(ValueError):
        C.scale_landmarks(np.zeros((2, 3)), 512, 256)


# ----------------------------------------------------------------------------------------------------------
# Head pose


def test_pose_difference_wraps_around():
    a = np.array([[179.0, 10.0, 0.0], [0.0, 350.0, -90.0], [30.0, -20.0, 180.0]])
    b = np.array([[-179.0, 350.0, 0.0], [0.0, -10.0, 90.0], [10.0, 20.0, -180.0]])
    d = C.pose_difference(a, b)
    assert np.allclose(d["yaw"], [2.0, 0.0, 20.0])
    assert np.allclose(d["pitch"], [20.0, 0.0, 40.0])
    assert np.allclose(d["roll"], [0.0, 180.0, 0.0])
    assert np.allclose(d["mean_abs"], [22 / 3, 60.0, 20.0])
    assert d["mean"]["yaw"] == pytest.approx(22 / 3) and d["mean"]["roll"] == pytest.approx(60.0)
    assert d["mean"]["mean_abs"] == pytest.approx((22 / 3 + 60 + 20) / 3)
    # symmetric; SPIGA's (N, 6) headpose accepted (translation ignored)
    assert np.allclose(C.pose_difference(b, a)["yaw"], d["yaw"])
    six = np.hstack([a, np.ones((3, 3))])
    assert np.allclose(C.pose_difference(six, b)["roll"], d["roll"])
    with pytest.raises(ValueError):
        C.pose_difference(a, b[:2])


def test_pose_difference_skips_nonfinite_in_means():
    d = C.pose_difference(np.array([[np.nan, 0, 0], [10.0, 0, 0]]), np.zeros((2, 3)))
    assert np.isnan(d["yaw"][0]) and d["mean"]["yaw"] == 10.0
    assert C.pose_difference(np.full((1, 3), np.nan), np.zeros((1, 3)))["mean"]["yaw"] is None


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("deg", [20.0, 1.0, 90.0, 170.0])
def test_geodesic_angle_of_a_single_axis_rotation(axis, deg):
    b = np.zeros((1, 3))
    b[0, axis] = deg
    assert C.geodesic_angle(np.zeros((1, 3)), b)[0] == pytest.approx(deg, abs=1e-4)


def test_geodesic_angle_identity_symmetry_wrap_and_triangle():
    rng = np.random.default_rng(0)
    a, b, c = (rng.uniform(-60, 60, (50, 3)) for _ in range(3))
    assert np.allclose(C.geodesic_angle(a, a), 0.0, atol=1e-4)
    ab = C.geodesic_angle(a, b)
    assert np.allclose(ab, C.geodesic_angle(b, a), atol=1e-4)
    assert ((ab >= 0) & (ab <= 180)).all()
    assert (C.geodesic_angle(a, c) <= ab + C.geodesic_angle(b, c) + 1e-3).all()
    # the same rotation written with angles 360 apart, and 179 vs -179 yaw (2 degrees)
    assert np.allclose(C.geodesic_angle(a, a + [360.0, -360.0, 360.0]), 0.0, atol=1e-3)
    assert C.geodesic_angle(np.array([[179.0, 0, 0]]), np.array([[-179.0, 0, 0]]))[0] == pytest.approx(2.0, abs=1e-3)
    # a yaw of 20 from a non-frontal head is still a 20 degree rotation when pitch and roll are 0
    assert C.geodesic_angle(np.array([[30.0, 0, 0]]), np.array([[50.0, 0, 0]]))[0] == pytest.approx(20.0, abs=1e-4)
    # several axes at once: at least the largest single change, at most their sum
    g = C.geodesic_angle(np.zeros((1, 3)), np.array([[20.0, 10.0, 5.0]]))[0]
    assert 20.0 < g < 35.0
    assert np.isnan(C.geodesic_angle(np.array([[np.nan, 0, 0]]), np.zeros((1, 3)))[0])


def test_geodesic_angle_uses_spigas_rotation():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(-40, 40, (5, 3)), rng.uniform(-40, 40, (5, 3))
    ra = S.euler_to_rotation(torch.from_numpy(a)).double().numpy()
    rb = S.euler_to_rotation(torch.from_numpy(b)).double().numpy()
    cos = np.clip((np.einsum("nij,nij->n", ra, rb) - 1) / 2, -1, 1)
    assert np.allclose(C.geodesic_angle(a, b), np.degrees(np.arccos(cos)), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Face detection


def test_box_iou():
    assert C.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert C.box_iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    assert C.box_iou([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0
    assert C.box_iou([0, 0, 0, 10], [0, 0, 10, 10]) == 0.0


def test_make_detector():
    hog = C.make_detector("dlib_hog", 0.7)
    assert isinstance(hog, C.DlibHogDetector) and hog.threshold == 0.7 and isinstance(hog, C.FaceDetector)
    assert hog.upsample == 0 and C.make_detector("dlib_hog", 0.5, upsample=2).upsample == 2
    none = C.make_detector("none", 0.5)
    assert isinstance(none, C.NoDetector) and none.detect(np.zeros((8, 8, 3), np.uint8)) is None
    assert isinstance(none, C.FaceDetector)
    with pytest.raises(ValueError):
        C.make_detector("mtcnn", 0.5)


@pytest.fixture(scope="module")
def dlib_hog():
    return C.DlibHogDetector(threshold=0.5)


def test_dlib_finds_the_face_in_a_real_photo(dlib_hog):
    cbook = pytest.importorskip("matplotlib.cbook")
    try:
        path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    except (OSError, ValueError):
        pytest.skip("matplotlib's sample data is not installed")
    if not path.is_file():
        pytest.skip("matplotlib's grace_hopper.jpg is not installed")
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)  # 512 wide x 600 high
    dets = dlib_hog.detect(image)
    assert len(dets) == 1
    (x, y, w, h), score = dets[0]
    assert score >= 0.5
    # the face: centre near (269, 245), about 216 px (dlib 20, upsample 0)
    assert abs(x + w / 2 - 269) < 30 and abs(y + h / 2 - 245) < 30 and 150 < w < 280


def test_dlib_finds_nothing_in_black_or_noise(dlib_hog):
    assert dlib_hog.detect(np.zeros((512, 512, 3), np.uint8)) == []
    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    assert dlib_hog.detect(noise) == []
    with pytest.raises(ValueError):
        dlib_hog.detect(np.zeros((512, 512), np.uint8))


# ----------------------------------------------------------------------------------------------------------
# control_fidelity plumbing, exactly, with a fake annotator and a fake detector


class FakeAnnotator:
    """``SpigaAnnotator.predict``'s signature; returns known landmarks/poses and records what it was given."""

    def __init__(self, landmarks, pose):
        self.landmarks, self.pose, self.calls = np.asarray(landmarks, float), np.asarray(pose, float), []

    def predict(self, crops, crop_boxes, boxes):
        i0 = sum(len(c[0]) for c in self.calls)
        self.calls.append((crops, np.asarray(crop_boxes), np.asarray(boxes)))
        n = len(crops)
        return self.landmarks[i0:i0 + n], self.pose[i0:i0 + n]


class FakeDetector:
    name = "fake"

    def __init__(self, per_image):
        self.per_image, self.seen = per_image, 0

    def detect(self, image_rgb):
        out = self.per_image[self.seen]
        self.seen += 1
        return out


def test_control_fidelity_known_answers(faces):
    images, pts = faces
    cond = pts[:, :68]
    cond_pose = np.array([[0.0, 0.0, 0.0], [10.0, -5.0, 3.0], [-170.0, 0.0, 0.0]])
    got_pose = cond_pose + [[20.0, 0, 0], [20.0, 0, 0], [-20.0, 0, 0]]  # -190 wraps to 170: still 20 degrees
    fake = FakeAnnotator(cond + (3.0, 4.0), np.hstack([got_pose, np.ones((3, 3))]))
    boxes = [face_box_from_landmarks(pts[i], 5.0) for i in range(3)]
    far = np.array([0.0, 0.0, 40.0, 40.0])
    det = FakeDetector([[(boxes[0], 1.0)], [(far, 2.0)], [(far, 1.0), (boxes[2] + [10, 10, 0, 0], 0.6)]])
    res = C.control_fidelity(images, cond, cond_pose, fake, det, box_margin=5.0, batch_size=2)
    per, summ = res["per_image"], res["summary"]

    # SPIGA was asked about the dataset's box (70-point rule = 68-point rule), in batches of <= 2
    assert [len(c[0]) for c in fake.calls] == [2, 1]
    assert np.allclose(np.vstack([c[2] for c in fake.calls]), np.stack(boxes))
    assert np.allclose(per["boxes"], np.stack(boxes))
    crop, crop_box = S.crop_face(images[2], boxes[2])
    assert torch.equal(fake.calls[1][0][0], torch.from_numpy(crop)) and np.allclose(fake.calls[1][1][0], crop_box)

    iod = interocular_distance(cond)
    assert np.allclose(per["nme"], 5.0 / iod, rtol=1e-12)
    assert summ["landmark_nme"] == summarize_nme(5.0 / iod, 0.08)
    assert summ["count"] == 3 and summ["spiga_nonfinite"] == 0
    assert np.allclose(per["pose_abs_diff"], [[20, 0, 0]] * 3)
    assert np.allclose(per["geodesic_deg"], 20.0, atol=1e-3)
    pe = summ["pose_error_deg"]
    assert pe["yaw"] == pytest.approx(20) and pe["pitch"] == 0 and pe["roll"] == 0
    assert pe["mean_abs"] == pytest.approx(20 / 3)
    assert pe["geodesic_mean"] == pytest.approx(20, abs=1e-3) and pe["geodesic_median"] == pytest.approx(20, abs=1e-3)
    # detection: image 0 on the box, image 1 only far away, image 2 a shifted box (IoU well above 0.3)
    assert per["face_found"].tolist() == [True, False, True]
    assert per["detection_iou"][0] == 1.0 and per["detection_iou"][1] == 0.0 and per["detection_iou"][2] > 0.8
    assert summ["face_detection_rate"] == pytest.approx(2 / 3)
    assert summ["face_detector"] == "fake"
    json.dumps(summ)


def test_control_fidelity_nonfinite_spiga_and_no_detector(faces):
    images, pts = faces
    cond = pts[:, :68]
    ldm = cond + (0.0, 6.0)
    ldm[1, 10] = np.nan
    fake = FakeAnnotator(ldm, np.zeros((3, 6)))
    res = C.control_fidelity(images, cond, np.zeros((3, 3)), fake, C.NoDetector())
    per, summ = res["per_image"], res["summary"]
    assert np.isnan(per["nme"][1]) and np.isnan(per["geodesic_deg"][1]) and np.isnan(per["headpose"][1]).all()
    assert summ["spiga_nonfinite"] == 1 and summ["landmark_nme"]["count"] == 2
    assert summ["landmark_nme"]["mean"] == pytest.approx(np.mean(6.0 / interocular_distance(cond)[[0, 2]]))
    assert summ["face_detection_rate"] is None and per["face_found"] is None
    assert summ["pose_error_deg"]["geodesic_mean"] == pytest.approx(0.0, abs=1e-4)
    json.dumps(summ)


def test_control_fidelity_on_smaller_images_scales_the_box(faces):
    images, pts = faces
    small = [cv2.resize(im, (256, 256), interpolation=cv2.INTER_AREA) for im in images]
    cond = C.scale_landmarks(pts[:, :68], 512, 256)
    fake = FakeAnnotator(cond + (1.5, 2.0), np.zeros((3, 6)))
    res = C.control_fidelity(small, cond, np.zeros((3, 3)), fake, C.NoDetector(), box_margin=5.0)
    assert np.allclose(res["per_image"]["boxes"], [face_box_from_landmarks(c, 2.5) for c in cond])
    # NME is that of the 512 px frame: the shift scaled with the image
    assert np.allclose(res["per_image"]["nme"], 5.0 / interocular_distance(pts[:, :68]), rtol=1e-12)


def test_control_fidelity_checks_inputs(faces):
    images, pts = faces
    fake = FakeAnnotator(pts[:, :68], np.zeros((3, 6)))
    with pytest.raises(ValueError):
        C.control_fidelity(images, pts, np.zeros((3, 3)), fake, C.NoDetector())  # 70 points
    with pytest.raises(ValueError):
        C.control_fidelity(images, pts[:, :68], np.zeros((2, 3)), fake, C.NoDetector())
    with pytest.raises(ValueError):
        C.control_fidelity([im.astype(np.float32) for im in images], pts[:, :68], np.zeros((3, 3)), fake, C.NoDetector())
    empty = C.control_fidelity([], np.zeros((0, 68, 2)), np.zeros((0, 3)), fake, C.NoDetector())
    assert empty["summary"]["count"] == 0 and empty["summary"]["landmark_nme"]["mean"] is None


# ----------------------------------------------------------------------------------------------------------
# control_fidelity end to end: SPIGA stand-in (random weights: structure and finiteness only) and real dlib


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return S.SpigaAnnotator.load(build_spiga_standin(tmp_path_factory.mktemp("spiga") / S.WEIGHTS_FILE), "cpu")


def test_control_fidelity_with_spiga_standin(faces, standin, dlib_hog):
    images, pts = faces[0][:2], faces[1][:2]  # ~4 faces/s on CPU: keep it to two
    cond = pts[:, :68]
    res = C.control_fidelity(images, cond, np.zeros((2, 3)), standin, dlib_hog, batch_size=1)
    per, summ = res["per_image"], res["summary"]
    assert per["landmarks"].shape == (2, 68, 2) and per["headpose"].shape == (2, 6)
    assert np.isfinite(per["landmarks"]).all() and np.isfinite(per["headpose"]).all()
    assert np.isfinite(per["nme"]).all() and (per["nme"] >= 0).all()
    assert per["face_found"].dtype == bool and per["face_found"].shape == (2,)
    assert 0.0 <= summ["face_detection_rate"] <= 1.0
    assert summ["count"] == 2 and summ["spiga_nonfinite"] == 0 and summ["landmark_nme"]["count"] == 2
    assert all(np.isfinite(v) for v in summ["pose_error_deg"].values())
    json.dumps(summ)
    # the same numbers as the dataset's annotate path (load_face's box rule on the 70 points, one forward)
    cut = [S.crop_face(im, face_box_from_landmarks(p, 5.0)) for im, p in zip(images, pts, strict=True)]
    ldm, pose = standin.predict(torch.from_numpy(np.stack([c[0] for c in cut])), np.stack([c[1] for c in cut]),
                                np.stack([face_box_from_landmarks(p, 5.0) for p in pts]))
    assert np.allclose(per["landmarks"], ldm, atol=1e-3) and np.allclose(per["headpose"], pose, atol=1e-4)
