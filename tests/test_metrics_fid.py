"""FID, KID, Inception Score (clean-fid, mode clean) and the reference_stats stage, on the stand-in Inception.

Nothing downloads: the Inception is the random-weight stand-in built by code (its numbers mean nothing;
the tests check the arithmetic and that our pipeline equals clean-fid's on the same network).
"""
from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.metrics import fid as F
from pipelines.standins import inception as SI

# --- known answers for the distances (no network) -----------------------------------------------------------


def exact_samples(mu: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n samples whose sample mean and sample covariance (n-1) are exactly ``mu`` and ``cov``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample cov = I
    return z @ np.linalg.cholesky(cov).T + mu


def test_stats_are_numpy_mean_and_unbiased_cov():
    x = np.arange(12, dtype=np.float64).reshape(4, 3) ** 1.5
    mu, sigma = F.stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, (x - mu).T @ (x - mu) / 3)


def test_frechet_distance_closed_form_diagonal():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.0, 2.5])
    d1, d2 = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 9.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)  # = 5.25 + 2.25
    assert expected == pytest.approx(7.5)
    assert F.fid_from_stats(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)
    a = exact_samples(mu1, np.diag(d1), 300, seed=1)
    b = exact_samples(mu2, np.diag(d2), 200, seed=2)
    assert F.fid_from_features(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_closed_form_commuting_covariances():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # shared eigenvectors: the covariances commute
    d1, d2 = rng.uniform(0.5, 3.0, 6), rng.uniform(0.5, 3.0, 6)
    s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    a, b = exact_samples(mu1, s1, 400, seed=3), exact_samples(mu2, s2, 400, seed=4)
    assert F.fid_from_features(a, b) == pytest.approx(expected, rel=1e-8)


def test_identical_sets_give_zero():
    # Full-rank covariance (n=500 > d=16): sqrtm(S @ S) = S to ~1e-12, so FID(a, a) is 0 to 1e-6.
    # (With d=2048 and a handful of images the covariance is singular and sqrtm of a singular product is only
    # accurate to ~sqrt(machine eps) * scale: clean-fid itself gives ~1e-3 there; see the stand-in test.)
    a = np.random.default_rng(5).normal(size=(500, 16)) * 3 + 1
    assert abs(F.fid_from_features(a, a)) < 1e-6
    # KID with the whole set as one subset is exactly the unbiased MMD^2 of a set with itself:
    # 2 * offdiag(K) / (m (m-1)) - 2 * sum(K) / m^2, which is O(1/m) of the kernel scale
    k = (a @ a.T / a.shape[1] + 1) ** 3
    m = len(a)
    off = k.sum() - np.trace(k)
    expected = 2 * off / (m * (m - 1)) - 2 * k.sum() / m ** 2
    kid = F.kid_from_features(a, a, num_subsets=3, max_subset_size=m)
    assert kid == pytest.approx(expected, rel=1e-9)
    assert abs(kid) < 0.01 * np.mean(np.diag(k))
    assert abs(F.kid_from_features(a, a, num_subsets=50, max_subset_size=100)) < 0.01 * np.mean(np.diag(k))


def test_shift_scores_worse_monotonically():
    a = np.random.default_rng(6).normal(size=(400, 8))
    v = np.linspace(-1, 1, 8)
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
    fids = [F.fid_from_features(a, a + t * v) for t in shifts]
    kids = [F.kid_from_features(a, a + t * v, num_subsets=20, max_subset_size=200) for t in shifts]
    # equal covariances: FID is exactly the squared mean shift
    np.testing.assert_allclose(fids, [t * t * v @ v for t in shifts], atol=1e-8)
    assert all(x < y for x, y in zip(fids, fids[1:], strict=False))
    assert all(x < y for x, y in zip(kids, kids[1:], strict=False))


def test_kid_is_seeded_and_leaves_numpy_global_state_alone():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(60, 5)), rng.normal(size=(50, 5)) + 0.3
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    k1 = F.kid_from_features(a, b, num_subsets=10, max_subset_size=20, seed=1)
    assert np.array_equal(np.random.get_state()[1], before)
    assert F.kid_from_features(a, b, num_subsets=10, max_subset_size=20, seed=1) == k1
    with pytest.raises(ValueError):
        F.kid_from_features(a[:1], b)


def test_save_and_load_reference(tmp_path):
    feats = np.random.default_rng(8).normal(size=(10, 4)).astype(np.float32)
    info = F.save_reference(tmp_path / "ref.npz", feats)
    assert info["count"] == 10 and info["dim"] == 4
    assert info["sha256"] == hashlib.sha256((tmp_path / "ref.npz").read_bytes()).hexdigest()
    assert F.save_reference(tmp_path / "again.npz", feats)["sha256"] == info["sha256"]  # deterministic bytes
    ref = F.load_reference(tmp_path / "ref.npz")
    np.testing.assert_array_equal(ref["features"], feats)
    mu, sigma = F.stats(feats)
    np.testing.assert_allclose(ref["mu"], mu)
    np.testing.assert_allclose(ref["sigma"], sigma)
    with pytest.raises(FileNotFoundError):
        F.load_reference(tmp_path / "missing.npz")


# --- the stand-in Inception through clean-fid's loader -----------------------------------------------------


def test_standin_constants_are_the_metrics():
    """The stand-in states the real file's facts itself (it does not import the metric code)."""
    assert (SI.INCEPTION_FILE, SI.FEATURE_DIM, SI.NUM_LOGITS) == (F.INCEPTION_FILE, F.FEATURE_DIM, F.NUM_LOGITS)


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inception")
    assert SI.build_inception_standin(d / F.INCEPTION_FILE, seed=0) == d / F.INCEPTION_FILE
    return d


def test_standin_archive_is_the_same_bytes_anywhere(inception_dir, tmp_path):
    """DVC hashes bytes: a second build (another interpreter, another folder) gives the same file, which holds
    no debug pickles (they name this machine's source paths) and loads as TorchScript."""
    import zipfile

    again = SI.build_inception_standin(tmp_path / "elsewhere" / F.INCEPTION_FILE, seed=0)
    assert again.read_bytes() == (inception_dir / F.INCEPTION_FILE).read_bytes()
    names = zipfile.ZipFile(again).namelist()
    assert not [n for n in names if n.endswith(".debug_pkl")] and any(n.endswith("serialization_id") for n in names)
    assert str(Path(__file__).resolve().parents[1]).encode() not in again.read_bytes()


@pytest.fixture(scope="module")
def inception(inception_dir):
    return F.load_inception(inception_dir, "cpu")


def _pngs(folder: Path, n: int, seed: int, size: tuple[int, int] = (40, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        base = rng.integers(0, 256, (1, 1, 3))
        img = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        files.append(folder / f"{i:03d}.png")
        Image.fromarray(img).save(files[-1])
    return files


def test_standin_has_the_real_torchscript_interface(inception_dir, inception):
    from cleanfid.inception_torchscript import InceptionV3W

    assert isinstance(inception, InceptionV3W)
    assert isinstance(inception.base, torch.jit.ScriptModule)
    x = torch.rand(2, 3, 299, 299) * 255
    with torch.no_grad():
        feats = inception(x)
        logits = F.inception_logits(inception)(x)
        probs = inception.base(x)  # the real file's default: softmax over 1008 classes
        probs_nb = inception.base(x, no_output_bias=True)
        feats_any = inception.base(torch.rand(2, 3, 64, 80) * 255, return_features=True)  # resizes inside
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008) and probs.shape == (2, 1008)
    assert feats_any.shape == (2, 2048)
    assert torch.isfinite(feats).all() and feats.std(0).sum() > 0
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    torch.testing.assert_close(probs_nb, logits.softmax(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(inception.base(x, return_features=True), feats, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in inception.parameters()) == 23_850_960  # the real file's size
    # the file or its folder; nothing else is accepted (clean-fid's loader reads that exact name)
    assert isinstance(F.load_inception(inception_dir / F.INCEPTION_FILE), InceptionV3W)
    with pytest.raises(FileNotFoundError):
        F.load_inception(inception_dir / "nope")


def test_features_match_cleanfid_and_in_memory_images(tmp_path, inception):
    from cleanfid.fid import get_files_features

    files = _pngs(tmp_path / "a", 3, seed=1)
    ours = F.image_features(files, inception, batch_size=2, num_workers=0, device="cpu")
    theirs = get_files_features([str(f) for f in files], model=inception, num_workers=0, batch_size=3,
                                device=torch.device("cpu"), mode="clean", verbose=False)
    assert ours.shape == (3, 2048) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    arrays = [np.array(Image.open(f)) for f in files]
    np.testing.assert_allclose(F.image_features(arrays, inception, batch_size=3), ours, rtol=1e-5, atol=1e-6)
    pils = [Image.open(f) for f in files]
    np.testing.assert_allclose(F.image_features(pils, inception, batch_size=1), ours, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_folder_fid_equals_cleanfid_compute_fid(tmp_path, inception):
    # two sqrtm of 2048x2048 matrices (ours and clean-fid's): about a minute on 2 CPU cores
    from cleanfid.fid import compute_fid

    a, b = _pngs(tmp_path / "a", 5, seed=2), _pngs(tmp_path / "b", 5, seed=3, size=(24, 30))
    ours = F.fid_from_features(F.image_features(a, inception, batch_size=5), F.image_features(b, inception, batch_size=5))
    theirs = compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean", custom_feat_extractor=inception,
                         device=torch.device("cpu"), num_workers=0, batch_size=5, verbose=False)
    assert ours > 0
    assert ours == pytest.approx(float(np.real(theirs)), rel=1e-6)


def test_inception_score_identical_images_is_one(inception):
    img = np.random.default_rng(9).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    mean, std = F.inception_score([img] * 4, inception, splits=2, batch_size=4)
    assert mean == pytest.approx(1.0, abs=1e-5)  # every prediction equal: KL(p || mean p) = 0
    assert std == pytest.approx(0.0, abs=1e-5)


def test_inception_score_known_answer(tmp_path, inception):
    files = _pngs(tmp_path / "is", 4, seed=4)
    mean, _ = F.inception_score(files, inception, splits=1, batch_size=2)
    with torch.no_grad():
        batch = torch.stack([F.clean_resize(f) for f in files])
        p = F.inception_logits(inception)(batch).double().softmax(1)
    expected = torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()).item()
    assert mean == pytest.approx(expected, rel=1e-4)
    assert mean >= 1.0
    uint8 = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files])
    assert F.inception_score(uint8, inception, splits=1)[0] == pytest.approx(mean, rel=1e-5)
    with pytest.raises(ValueError):
        F.inception_score(files, inception, splits=10)


# --- the reference_stats stage ---------------------------------------------------------------------------------


def _tiny_dataset(root: Path, n: int = 4) -> None:
    from pipelines.facesynthetics_dataset import SCHEMA
    from pipelines.hfdata import ParquetShardWriter

    rng = np.random.default_rng(10)
    with ParquetShardWriter(root, "validation", SCHEMA.features, rows_per_file=2) as w:
        for i in range(n):
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # the schema fixes no image size
            w.write({"id": f"{n - i:06d}", "image": img, "conditioning_image": img, "text": "a face",
                     "landmarks": np.zeros((68, 2), np.float32), "headpose": [0.0] * 6, "face_box": [0.0, 0, 32, 32],
                     "source_landmarks": np.zeros((70, 2), np.float32), "segmentation": img[..., 0]})


@pytest.mark.slow
def test_reference_stats_stage(tmp_path, monkeypatch, inception_dir):
    from pipelines.reports import ModelInfo, write_model_manifest
    from stages import reference_stats as stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    _tiny_dataset(tmp_path / "data/datasets/facesynthetics_spiga")
    model_dir = tmp_path / "data/models/inception"
    model_dir.mkdir(parents=True)
    (model_dir / F.INCEPTION_FILE).symlink_to(inception_dir / F.INCEPTION_FILE)
    write_model_manifest(model_dir, ModelInfo(name="inception", id=F.INCEPTION_FILE, revision="x",
                                              source="built by code", standin=True))
    (tmp_path / "params.yaml").write_text(textwrap.dedent("""
        base: {profile: sample, seed: 0, device: cpu, image_size: 512, launcher: python}
        reference_stats:
          split: validation
          batch_size: {sample: 3, real: 128}
          num_workers: {sample: 0, real: 8}
    """))
    report = stage.main([])
    npz = tmp_path / "data/metrics/reference/facesynthetics_spiga_validation.npz"
    js = tmp_path / "data/metrics/reference/facesynthetics_spiga_validation.json"
    saved = json.loads(js.read_text())
    assert saved["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest() == report["sha256"]
    assert saved["count"] == 4 and saved["dim"] == 2048 and saved["mode"] == "clean"
    assert saved["implementation"].startswith("clean-fid 0.")
    assert saved["feature_layer"] == "pool3 2048" and saved["image_size"] == 299
    assert saved["model"]["standin"] is True and saved["uses_standin_models"] is True
    ref = F.load_reference(npz)
    assert ref["features"].shape == (4, 2048) and ref["sigma"].shape == (2048, 2048)
    first = js.read_bytes()
    stage.main([])
    assert js.read_bytes() == first  # same inputs: same npz hash, byte-identical report
    assert hashlib.sha256(npz.read_bytes()).hexdigest() == saved["sha256"]


def test_reference_stats_config_rejects_bad_values():
    from stages.config import ParamError, parse
    from stages.reference_stats import ReferenceStatsConfig

    with pytest.raises(ParamError, match="batch_size"):
        parse(ReferenceStatsConfig, {"split": "validation", "batch_size": 0, "num_workers": 0}, "reference_stats")
    with pytest.raises(ParamError, match="num_workers"):
        parse(ReferenceStatsConfig, {"split": "validation", "batch_size": 1, "num_workers": -1}, "reference_stats")
