"""Known answers for head-pose labels: PnP round trip, signs, SPIGA conversion, AFLW conversion, x/y/scale, direction."""
import numpy as np
import pytest
import torch

from pipelines.faces.boxes import face_box_from_landmarks
from pipelines.faces.pose import (
    SPIGA_AXES,
    camera_rotation,
    direction,
    ours_to_spiga_rotation,
    pnp_pose,
    position_scale,
    rotation_to_pose,
    spiga_pose_to_ours,
)
from pipelines.faces.spiga import euler_to_rotation, model_3d
from pipelines.headpose import MULTIPLE_FACES_LARGEST, MULTIPLE_FACES_SKIPPED, NO_FACE, mae_block, select_face
from pipelines.sources import aflw2000 as A
from pipelines.sources.sample_faces import FOCAL_RATIO, mean_face_3d, project_face

SIZE = 512


def render(yaw, pitch, roll, center=(256.0, 256.0), scale=0.45):
    """68 points of the mean face at a pose relative to the line of sight (our labels' convention)."""
    m = mean_face_3d()
    width = m[:, 0].max() - m[:, 0].min()
    f = FOCAL_RATIO * SIZE
    depth = f * width / (scale * SIZE)
    t = np.array([(center[0] - SIZE / 2) * depth / f, (center[1] - SIZE / 2) * depth / f, depth])
    cam = rotation_to_pose(camera_rotation(yaw, pitch, roll, t))
    return project_face(*cam, center, scale, SIZE)[:68]


def test_pnp_round_trip_within_one_degree():
    # Exact (noise-free) projections: the only error is the principal point at the box centre instead of the
    # true one (a pure shift, not the rotated camera it stands for); measured max 0.76 deg over 200 poses,
    # so 1 deg is the tolerance (below the 5-deg scale of the thresholds and of published AFLW errors).
    rng = np.random.default_rng(1)
    errs = []
    for _ in range(40):
        pose = rng.uniform([-60, -30, -30], [60, 30, 30])
        c = tuple(256 + rng.uniform(-80, 80, 2))
        pts = render(*pose, center=c, scale=rng.uniform(0.3, 0.6))
        errs.append(np.abs(np.array(pnp_pose(pts, face_box_from_landmarks(pts, 5), SIZE)) - pose))
    assert np.max(errs) < 1.0


def test_yaw_sign_face_turned_image_left():
    pts = render(30, 0, 0)
    assert pts[30, 0] < pts[:, 0].mean()  # nose tip left of the face centre: turned toward image-left
    yaw, pitch, roll = pnp_pose(pts, face_box_from_landmarks(pts, 5), SIZE)
    assert yaw == pytest.approx(30, abs=1) and abs(pitch) < 1 and abs(roll) < 1
    up = render(0, 20, 0)
    assert pnp_pose(up, face_box_from_landmarks(up, 5), SIZE)[1] == pytest.approx(20, abs=1)
    cw = render(0, 0, 15)
    assert cw[27, 0] > cw[8, 0]  # nose bridge right of the chin: top of the head moved to image-right
    assert pnp_pose(cw, face_box_from_landmarks(cw, 5), SIZE)[2] == pytest.approx(15, abs=1)


def test_box_principal_point_removes_off_centre_bias():
    # A frontal face rendered at the image centre, then the image cropped so that the face sits 150 px above
    # the crop's centre (photos are crops: the image centre is not the camera's principal point).
    pts = render(0, 0, 0) + np.array([0.0, -150.0])
    box = face_box_from_landmarks(pts, 5)
    biased = pnp_pose(pts, box, SIZE, principal_point="image", line_of_sight=False)
    fixed = pnp_pose(pts, box, SIZE, principal_point="box", line_of_sight=False)
    assert abs(biased[1]) > 5  # ~atan(150 / 768) = 11 deg of false pitch
    assert np.max(np.abs(fixed)) < 1.0  # residual: box centre vs head centre
    assert np.max(np.abs(pnp_pose(pts, box, SIZE))) < 0.5  # the labels' default (box + line of sight)


def test_spiga_axes_and_conversion_from_rotation_maths():
    world, _ = model_3d()
    assert np.allclose(mean_face_3d() @ SPIGA_AXES.T, world)
    assert np.allclose(spiga_pose_to_ours(np.zeros(6)), 0, atol=1e-5)  # SPIGA's frontal is ours
    # single angles: SPIGA yaw has the opposite sign, pitch and roll the same
    assert np.allclose(spiga_pose_to_ours([20, 0, 0]), [-20, 0, 0], atol=1e-4)
    assert np.allclose(spiga_pose_to_ours([0, 20, 0]), [0, 20, 0], atol=1e-4)
    assert np.allclose(spiga_pose_to_ours([0, 0, 20]), [0, 0, 20], atol=1e-4)
    from spiga.data.loaders.augmentors.utils import rotation_matrix_to_euler

    rng = np.random.default_rng(0)
    for pose in rng.uniform([-60, -30, -30], [60, 30, 30], (20, 3)):
        e = rotation_matrix_to_euler(ours_to_spiga_rotation(*pose))
        r = euler_to_rotation(torch.tensor([e])).double().numpy()[0]
        assert np.allclose(r @ world.T, ours_to_spiga_rotation(*pose) @ world.T, atol=1e-5)
        assert np.allclose(spiga_pose_to_ours(e), pose, atol=1e-3)


def test_aflw_conversion_signs_and_inverse():
    assert np.allclose(A.aflw_to_ours(0, np.radians(30), 0), [30, 0, 0])
    assert np.allclose(A.aflw_to_ours(np.radians(20), 0, 0), [0, 20, 0])
    assert np.allclose(A.aflw_to_ours(0, 0, np.radians(10)), [0, 0, 10])
    for pose in np.random.default_rng(2).uniform([-70, -30, -25], [70, 30, 25], (10, 3)):
        assert np.allclose(A.aflw_to_ours(*A.ours_to_aflw(*pose)), pose, atol=1e-9)
    assert A.within_protocol([10, -99, 5]) and not A.within_protocol([0, 99.5, 0])


def test_position_scale_known_boxes():
    assert position_scale([0, 0, 100, 100], 200, 200) == pytest.approx((0.25, 0.25, 0.5))
    assert position_scale([100, 50, 60, 80], 400, 200) == pytest.approx((130 / 400, 90 / 200, 80 / 200))


def test_direction_thresholds_and_precedence():
    t = {"yaw": 15, "pitch": 10}
    assert direction(0, 0, t) == "front"
    assert direction(15, 10, t) == "front"  # equal is not past
    assert direction(16, 0, t) == "left" and direction(-16, 0, t) == "right"
    assert direction(0, 11, t) == "up" and direction(0, -11, t) == "down"
    assert direction(30, 11, t) == "left"  # 2.0 x vs 1.1 x its threshold
    assert direction(16, -25, t) == "down"  # 1.07 x vs 2.5 x
    assert direction(30, 20, t) == "left"  # tie: yaw


def test_select_face_rule():
    a, b = (np.array([0, 0, 100, 100.0]), 1.0), (np.array([200, 0, 50, 50.0]), 2.0)
    assert select_face([], 2.0) == (None, NO_FACE)
    box, note = select_face([b, a], 2.0)
    assert note == MULTIPLE_FACES_LARGEST and np.allclose(box, a[0])
    assert select_face([a, (np.array([200, 0, 90, 90.0]), 1.0)], 2.0) == (None, MULTIPLE_FACES_SKIPPED)


def test_mae_block_wraps_and_ignores_nan():
    m = mae_block(np.array([[179, 0, 0], [0, 0, 0]]), np.array([[-179, 2, 4], [np.nan, 0, 0]]))
    assert m["count"] == 1 and m["yaw"] == pytest.approx(2) and m["overall"] == pytest.approx(8 / 3)


def test_sample_mat_files_are_the_same_bytes_every_run(tmp_path):
    """scipy writes the creation time into a .mat header; the sample's files must not change run to run."""
    import numpy as np
    import scipy.io

    arrays = {"Pose_Para": np.zeros((1, 7)), "pt3d_68": np.ones((3, 68))}
    first = A.write_mat(tmp_path / "a.mat", arrays).read_bytes()
    import time

    time.sleep(1.1)  # the header's clock has one-second resolution
    assert A.write_mat(tmp_path / "b.mat", arrays).read_bytes() == first
    assert np.array_equal(scipy.io.loadmat(str(tmp_path / "b.mat"))["pt3d_68"], arrays["pt3d_68"])

