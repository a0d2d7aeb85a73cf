"""FID, KID and Inception Score with clean-fid's Inception (TorchScript) in mode ``clean``.

Features come from clean-fid's own pieces: its TorchScript wrapper
(:class:`cleanfid.inception_torchscript.InceptionV3W`, never asked to download), its ``clean`` resizer
(PIL bicubic on float32 channels to 299x299) and its :func:`cleanfid.fid.frechet_distance` /
:func:`cleanfid.fid.kernel_distance`; so a number made here equals ``cleanfid.fid.compute_fid(...,
mode='clean')`` on the same images and weights. Reference statistics are saved in the project
(a DVC output), never in clean-fid's package folder.

The Inception Score uses the same network's 1008 ImageNet logits without the output bias (as
StyleGAN's metrics call the TorchScript file with ``no_output_bias=True``, and as torch-fidelity's
``logits_unbiased``), fed to torchmetrics' :class:`~torchmetrics.image.inception.InceptionScore`.

:func:`load_inception` also reads the random-weight Inception-v3 with the real file's interface and size that
:func:`pipelines.standins.inception.build_inception_standin` writes: its features are meaningless, and
FID/KID/IS made with it are comparable to nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

INCEPTION_FILE = "inception-2015-12-05.pt"
FEATURE_DIM = 2048
NUM_LOGITS = 1008
IMAGE_SIZE = 299
MODE = "clean"
FEATURE_LAYER = "pool3 2048"


def cleanfid_version() -> str:
    """``clean-fid <version>``: the implementation named in every report."""
    return f"clean-fid {metadata.version('clean-fid')}"


# ---------------------------------------------------------------------------------------------------
# the network


def _inception_file(path: str | Path) -> Path:
    """The TorchScript file: ``path`` itself or ``path/inception-2015-12-05.pt``."""
    path = Path(path)
    file = path / INCEPTION_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: the Inception weights come from the fetch_models stage")
    if file.name != INCEPTION_FILE:
        raise ValueError(f"{file}: clean-fid's loader reads a file named {INCEPTION_FILE}")
    return file


class InceptionLogits(nn.Module):
    """The 1008 ImageNet logits (no output bias) of a loaded :class:`InceptionV3W`, same input as it:
    a float batch (B, 3, 299, 299) in [0, 255], already resized the clean-fid way."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, x: Tensor) -> Tensor:
        feats = self.features(x.float())
        return F.linear(feats, self.features.base.output.weight)


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load clean-fid's Inception TorchScript file (real or stand-in) exactly as clean-fid's mode ``clean`` does.

    ``path`` is the file or its directory. Returns clean-fid's own :class:`InceptionV3W`
    (``download=False, resize_inside=False``), in eval mode on ``device``: a float batch
    (B, 3, 299, 299) in [0, 255] -> (B, 2048) pool3 features. Get the logits with :func:`inception_logits`.
    """
    from cleanfid.inception_torchscript import InceptionV3W

    file = _inception_file(path)
    model = InceptionV3W(str(file.parent), download=False, resize_inside=False)
    return model.to(torch.device(device)).eval()


def inception_logits(model: nn.Module) -> InceptionLogits:
    """A module giving the 1008 unbiased logits of the network loaded by :func:`load_inception`."""
    return InceptionLogits(model).eval()


# ---------------------------------------------------------------------------------------------------
# features


class _ArrayDataset(torch.utils.data.Dataset):
    """In-memory images (PIL or HxWx3 uint8) through clean-fid's ``clean`` resize, as its ResizeDataset does files."""

    def __init__(self, images: Sequence[Any]):
        from cleanfid.resize import build_resizer

        self.images = images
        self.fn_resize = build_resizer(MODE)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return clean_resize(self.images[i], self.fn_resize)


def clean_resize(image: Any, fn_resize: Any = None) -> Tensor:
    """One image (PIL, HxWx3 uint8 array, or path) -> float (3, 299, 299) in [0, 255], clean-fid's way."""
    if fn_resize is None:
        from cleanfid.resize import build_resizer

        fn_resize = build_resizer(MODE)
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        arr = np.array(image.convert("RGB"))
    else:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 image, got {arr.dtype} {arr.shape}")
    resized = fn_resize(arr)
    if resized.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1), dtype=np.float32))


def _loader(images: Sequence[Any], batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    from cleanfid.utils import ResizeDataset

    if all(isinstance(x, (str, Path)) for x in images):
        dataset: torch.utils.data.Dataset = ResizeDataset([str(x) for x in images], mode=MODE)
    else:
        dataset = _ArrayDataset(images)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                                       num_workers=num_workers)


def iter_batches(images: Sequence[Any], batch_size: int = 32, num_workers: int = 0) -> Iterator[Tensor]:
    """Batches (B, 3, 299, 299) float in [0, 255] of files (clean-fid's ResizeDataset) or in-memory images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    yield from _loader(images, batch_size, num_workers)


def image_features(files: Sequence[Any], model: nn.Module, batch_size: int = 32, num_workers: int = 0,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """Inception pool3 features (N, 2048) float32 of image files (or PIL / uint8 arrays), clean-fid mode ``clean``.

    For files this is clean-fid's ``get_files_features(files, model, mode='clean')``; in-memory images go
    through the same resizer and tensor conversion.
    """
    if len(files) == 0:
        return np.zeros((0, FEATURE_DIM), dtype=np.float32)
    device = torch.device(device)
    out = []
    with torch.no_grad():
        for batch in iter_batches(files, batch_size, num_workers):
            out.append(model(batch.to(device)).detach().cpu().numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------
# statistics and distances


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov(rowvar=False)``, n-1) of features (N, D), as clean-fid computes them."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features (N>=2, D), got shape {features.shape}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): clean-fid's ``frechet_distance``."""
    from cleanfid.fid import frechet_distance

    return float(np.real(frechet_distance(mu1, sigma1, mu2, sigma2)))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (N, D) and (M, D)."""
    return fid_from_stats(*stats(a), *stats(b))


@contextlib.contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def kid_from_features(a: np.ndarray, b: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
                      seed: int = 0) -> float:
    """KID (unbiased MMD² with the cubic polynomial kernel): clean-fid's ``kernel_distance``.

    clean-fid draws the subsets from numpy's global generator; here that draw is seeded with ``seed`` and
    the global state restored, so the value is reproducible. Subsets have ``min(N, M, max_subset_size)`` rows.
    """
    from cleanfid.fid import kernel_distance

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if min(len(a), len(b)) < 2:
        raise ValueError("KID needs at least 2 samples per set")
    with _numpy_seed(seed):
        return float(kernel_distance(a, b, num_subsets=num_subsets, max_subset_size=max_subset_size))


def reference_paths(out_dir: str | Path, dataset: str, split: str) -> tuple[Path, Path]:
    """``(npz, json)`` of the reference statistics of ``dataset``'s ``split`` under ``out_dir`` (the one naming
    rule the writer and the readers share)."""
    out_dir = Path(out_dir)
    return out_dir / f"{dataset}_{split}.npz", out_dir / f"{dataset}_{split}.json"


def save_reference(path_npz: str | Path, features: np.ndarray) -> dict:
    """Write features, mu and sigma to ``path_npz`` (deterministic bytes); return sha256, count and dim."""
    path = Path(path_npz)
    path.parent.mkdir(parents=True, exist_ok=True)
    features = np.asarray(features, dtype=np.float32)
    mu, sigma = stats(features)
    buf = io.BytesIO()
    np.savez(buf, features=features, mu=mu, sigma=sigma)  # uncompressed: no timestamps, same bytes on rerun
    data = buf.getvalue()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return {"sha256": hashlib.sha256(data).hexdigest(), "count": int(features.shape[0]),
            "dim": int(features.shape[1])}


def load_reference(path_npz: str | Path) -> dict[str, np.ndarray]:
    """Read ``features``, ``mu`` and ``sigma`` written by :func:`save_reference`."""
    path = Path(path_npz)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the reference_stats stage")
    with np.load(path) as z:
        return {k: z[k] for k in ("features", "mu", "sigma")}


# ---------------------------------------------------------------------------------------------------
# Inception Score


def inception_score(images: Sequence[Any] | Tensor, model: nn.Module, splits: int = 10, batch_size: int = 32,
                    device: str | torch.device = "cpu", num_workers: int = 0, seed: int = 0) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) with torchmetrics' ``InceptionScore``.

    ``images``: files, PIL images, HxWx3 uint8 arrays, or a uint8 tensor (N, 3, H, W); all are resized the
    clean-fid way. ``model`` is what :func:`load_inception` returns; its unbiased logits are the feature
    (never torchmetrics' default network, which downloads). torchmetrics shuffles before splitting: the
    shuffle is seeded with ``seed``.
    """
    from torchmetrics.image.inception import InceptionScore

    if isinstance(images, Tensor):
        images = [img.permute(1, 2, 0).cpu().numpy().astype(np.uint8) for img in images]
    if len(images) < splits:
        raise ValueError(f"Inception Score over {splits} splits needs at least {splits} images, got {len(images)}")
    device = torch.device(device)
    with warnings.catch_warnings():  # "will save all extracted features in buffer": intended (N x 1008 floats)
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = InceptionScore(feature=inception_logits(model), splits=splits).to(device)
    with torch.no_grad():
        for batch in iter_batches(images, batch_size, num_workers):
            metric.update(batch.to(device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mean, std = metric.compute()
    return float(mean), float(std)


# ---------------------------------------------------------------------------------------------------
# reference statistics of a Hub-layout dataset


class _ImageColumn:
    """``dataset[i][column]`` as a lazy sequence (images decode per item, in DataLoader workers too)."""

    def __init__(self, dataset: Any, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(i)][self.column]


def load_split_images(dataset_dir: str | Path, split: str, column: str = "image",
                      cache_dir: str | Path | None = None) -> tuple[Any, list[str]]:
    """The ``column`` images of ``split`` of the Hub-layout dataset at ``dataset_dir``, sorted by ``id``
    (the order the generate stage uses): a lazy sequence of PIL images, and the ids."""
    from pipelines.hfdata import load_split_sorted

    ds = load_split_sorted(dataset_dir, split, ["id", column], cache_dir=cache_dir)
    return _ImageColumn(ds, column), list(ds["id"])


def reference_statistics(dataset_dir: str | Path, split: str, model_dir: str | Path, out_npz: str | Path,
                         batch_size: int = 32, num_workers: int = 0, device: str | torch.device = "cpu",
                         cache_dir: str | Path | None = None) -> dict:
    """Inception features (and mu, sigma) of a dataset split's images written to ``out_npz``.

    Returns the description a report carries: sha256 of the npz, count, dim, implementation, mode,
    feature layer, image size, and images/s of the feature pass.
    """
    import time

    images, ids = load_split_images(dataset_dir, split, cache_dir=cache_dir)
    if len(images) < 2:
        raise ValueError(f"{dataset_dir} split {split!r} has {len(images)} image(s): reference statistics need >= 2")
    model = load_inception(model_dir, device)
    start = time.perf_counter()
    feats = image_features(images, model, batch_size=batch_size, num_workers=num_workers, device=device)
    seconds = time.perf_counter() - start
    saved = save_reference(out_npz, feats)
    return {**saved, "implementation": cleanfid_version(), "mode": MODE, "feature_layer": FEATURE_LAYER,
            "image_size": IMAGE_SIZE, "split": split, "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            "images_per_second": len(feats) / seconds if seconds > 0 else None}
