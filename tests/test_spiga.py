"""Batched SPIGA: crops bit-identical to the released pretreatment, batched forward == the released
one-image framework, the stand-in checkpoint has the real keys and gives finite in-crop outputs."""
import numpy as np
import pytest
import torch

from pipelines.faces import spiga as S
from pipelines.standins import spiga as SS

BOXES_512 = [
    [156.0, 150.0, 200.0, 230.0],  # ordinary face box
    [-50.0, 400.0, 180.0, 170.0],  # partly off the image (left and bottom)
    [10.3, 20.7, 60.0, 90.0],  # small, fractional, near the corner
    [300.5, 280.25, 250.0, 190.0],  # wider than tall, runs off the right edge
]


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Three 512x512 RGB images with structure (gradients + noise), so misplaced pixels show."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:512, 0:512]
    out = []
    for k in range(3):
        base = np.stack([(xx + 40 * k) % 256, (yy * 2) % 256, (xx + yy) // 4 % 256], axis=-1)
        out.append(np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> S.SpigaAnnotator:
    path = SS.build_spiga_standin(tmp_path_factory.mktemp("spiga") / S.WEIGHTS_FILE, seed=0)
    return S.SpigaAnnotator.load(path, "cpu", "fp32")


def test_constants_match_spiga():
    from spiga.data.loaders.dl_config import DatabaseStruct
    from spiga.inference.config import ModelConfig

    db = DatabaseStruct(S.DATASET)
    cfg = ModelConfig(S.DATASET, load_model_url=False)
    assert (db.num_landmarks, db.num_edges) == (S.NUM_LANDMARKS, S.NUM_EDGES) == (68, 13)
    assert cfg.image_size == (S.CROP_SIZE, S.CROP_SIZE) and cfg.ftmap_size == (S.FTMAP_SIZE, S.FTMAP_SIZE)
    assert (cfg.target_dist, cfg.focal_ratio, cfg.model_weights) == (S.TARGET_DIST, S.FOCAL_RATIO, S.WEIGHTS_FILE)


def test_standin_constants_are_the_annotators():
    """The stand-in states the released checkpoint's facts itself (it does not import the annotator)."""
    assert (SS.NUM_LANDMARKS, SS.NUM_EDGES, SS.WEIGHTS_FILE) == (S.NUM_LANDMARKS, S.NUM_EDGES, S.WEIGHTS_FILE)


def test_model_3d_matches_addmodel3d():
    from spiga.data.loaders.dl_config import DatabaseStruct
    from spiga.data.loaders.transforms import AddModel3D

    ref = AddModel3D(DatabaseStruct(S.DATASET).ldm_ids, ftmap_size=(64, 64), focal_ratio=1.5)()
    world, cam = S.model_3d()
    np.testing.assert_array_equal(world, ref["model3d"])
    np.testing.assert_array_equal(cam, ref["cam_matrix"])
    np.testing.assert_array_equal(cam, [[96, 0, 32], [0, 96, 32], [0, 0, 1]])


@pytest.mark.parametrize("box", BOXES_512)
def test_crop_face_is_bit_identical_to_spiga_pretreatment(images, box):
    from spiga.inference.config import ModelConfig
    from spiga.inference.pretreatment import get_transformers

    transforms = get_transformers(ModelConfig(S.DATASET, load_model_url=False))
    for rgb in images[:2]:
        crop, crop_box = S.crop_face(rgb, box)
        ref = transforms({"image": np.ascontiguousarray(rgb[:, :, ::-1]), "bbox": list(box)})
        # SPIGAFramework.pretreat: torch.tensor(np.array(crops), dtype=torch.float)
        ref_crop = torch.tensor(np.array([ref["image"]]), dtype=torch.float)[0].numpy()
        assert crop.dtype == np.float32 and crop.shape == (3, 256, 256)
        np.testing.assert_array_equal(crop, ref_crop)
        np.testing.assert_array_equal(crop_box, ref["bbox"])


def test_crop_face_known_geometry():
    """A square box maps to a centred square of side 256 / 1.6 = 160 px; BGR channel order."""
    img = np.zeros((512, 512, 3), np.uint8)
    img[..., 0] = 255  # pure red in RGB
    crop, crop_box = S.crop_face(img, [100, 100, 200, 200])
    np.testing.assert_allclose(crop_box, [48, 48, 160, 160])
    assert crop[2].min() == 1.0 and crop[0].max() == 0.0 and crop[1].max() == 0.0  # red lands in channel 2 (BGR)
    crop, _ = S.crop_face(img, [-300, -300, 200, 200])  # wholly off the image: black fill
    assert crop.max() == 0.0


def test_standin_checkpoint_has_the_real_keys(standin, tmp_path):
    path = SS.build_spiga_standin(tmp_path / "a.pt", seed=0)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert list(state) == list(S.new_model().state_dict())
    # same seed, same weights (the file is reproducible)
    state2 = torch.load(SS.build_spiga_standin(tmp_path / "b.pt", seed=0), map_location="cpu", weights_only=True)
    assert all(torch.equal(state[k], state2[k]) for k in state)


def _batch(images, pairs):
    crops, crop_boxes, boxes = [], [], []
    for i, box in pairs:
        c, cb = S.crop_face(images[i], box)
        crops.append(c), crop_boxes.append(cb), boxes.append(box)
    return torch.from_numpy(np.stack(crops)), np.stack(crop_boxes), np.array(boxes)


PAIRS = [(0, BOXES_512[0]), (1, BOXES_512[1]), (1, BOXES_512[3]), (2, BOXES_512[0])]


@pytest.fixture(scope="module")
def batched(standin, images):
    return standin.predict(*_batch(images, PAIRS))


def test_standin_outputs_finite_and_in_crop(batched):
    landmarks, pose = batched
    assert landmarks.shape == (4, 68, 2) and pose.shape == (4, 6)
    assert np.isfinite(landmarks).all() and np.isfinite(pose).all()
    for (_, box), ldm in zip(PAIRS, landmarks, strict=True):
        x, y, w, h = box
        side = max(w, h) * S.TARGET_DIST  # the crop window in image pixels
        cx, cy = x + w / 2, y + h / 2
        assert (np.abs(ldm[:, 0] - cx) < side / 2).all() and (np.abs(ldm[:, 1] - cy) < side / 2).all()
    np.testing.assert_allclose(pose[:, 5], 4.0, atol=0.1)  # the stand-in's frontal pose at depth 4


def test_batched_predict_equals_released_framework(standin, images, batched):
    landmarks, pose = batched
    by_image: dict[int, list[int]] = {}
    for n, (i, _) in enumerate(PAIRS):
        by_image.setdefault(i, []).append(n)
    for i, rows in by_image.items():
        bgr = np.ascontiguousarray(images[i][:, :, ::-1])
        ref = S.original_inference(standin.model, bgr, [PAIRS[n][1] for n in rows], "cpu")
        assert ref["landmarks"].shape == (len(rows), 68, 2)
        np.testing.assert_allclose(landmarks[rows], ref["landmarks"], atol=1e-3, rtol=0)
        np.testing.assert_allclose(pose[rows], ref["headpose"], atol=1e-4, rtol=0)


def test_fp32_is_deterministic(standin, images, batched):
    landmarks, pose = standin.predict(*_batch(images, PAIRS))
    np.testing.assert_array_equal(landmarks, batched[0])
    np.testing.assert_array_equal(pose, batched[1])


def test_bf16_autocast_runs_close(standin, images, batched):
    fast = S.SpigaAnnotator(standin.model, "cpu", "bf16")
    landmarks, pose = fast.predict(*_batch(images, PAIRS[:1]))
    assert np.isfinite(landmarks).all() and np.isfinite(pose).all()
    assert np.abs(landmarks - batched[0][:1]).max() < 5.0  # px at 512: half precision, same answer


def test_predict_checks_lengths_and_empty(standin):
    with pytest.raises(ValueError):
        standin.predict(torch.zeros(2, 3, 256, 256), np.zeros((1, 4)), np.zeros((2, 4)))
    ldm, pose = standin.predict(torch.zeros(0, 3, 256, 256), np.zeros((0, 4)), np.zeros((0, 4)))
    assert ldm.shape == (0, 68, 2) and pose.shape == (0, 6)


def test_load_is_strict(tmp_path):
    state = S.new_model().state_dict()
    state.pop("pose_fc.bias")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="pose_fc.bias"):
        S.SpigaAnnotator.load(tmp_path / "bad.pt", "cpu")
    with pytest.raises(FileNotFoundError):
        S.SpigaAnnotator.load(tmp_path / "missing.pt", "cpu")


def test_euler_to_rotation_matches_released_and_is_a_rotation():
    from spiga.models.gnn.pose_proj import euler_to_rotation_matrix

    euler = torch.tensor([[0.0, 0.0, 0.0], [30.0, -12.0, 5.0], [-70.0, 25.0, -40.0]])
    ours = S.euler_to_rotation(euler)
    torch.testing.assert_close(ours, euler_to_rotation_matrix(euler.clone()), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours @ ours.transpose(1, 2), torch.eye(3).expand(3, 3, 3), rtol=0, atol=1e-6)
    assert torch.equal(euler, torch.tensor([[0.0, 0.0, 0.0], [30.0, -12.0, 5.0], [-70.0, 25.0, -40.0]]))  # untouched


def test_device_agnostic_model_equals_released_class(standin):
    """Our SPIGA subclass (pose projection on the input's device) computes what the released class does."""
    from spiga.models.spiga import SPIGA

    released = SPIGA(num_landmarks=68, num_edges=13).eval()
    released.load_state_dict(standin.model.state_dict())
    crops = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    inputs = [crops, standin.model3d.expand(2, -1, -1), standin.cam_matrix.expand(2, -1, -1)]
    with torch.inference_mode():
        ours, ref = standin.model(inputs), released([t.clone() for t in inputs])
    torch.testing.assert_close(ours["Pose"], ref["Pose"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["Landmarks"][-1], ref["Landmarks"][-1], rtol=0, atol=1e-5)
