"""Reading the raw FaceSynthetics layout: ``{id:06d}.png``, ``{id:06d}_seg.png``, ``{id:06d}_ldmks.txt``.

Every reader raises :class:`SampleError` with a stable ``reason`` code for a bad sample, so stages can
skip the row and count it in their report instead of crashing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines import images

NUM_SOURCE_LANDMARKS = 70  # iBUG 68 + 2 pupils
#: The official zips and the samples each holds (the names of the Microsoft FaceSynthetics release).
SUBSET_SIZES = {"dataset_100": 100, "dataset_1000": 1000, "dataset_100000": 100_000}
_ID = re.compile(r"^(\d{6})(?:_seg\.png|_ldmks\.txt|\.png)$")

# Stable skip reasons (they appear in reports; do not rename lightly).
MISSING_IMAGE = images.MISSING_IMAGE
CORRUPT_IMAGE = images.CORRUPT_IMAGE
WRONG_IMAGE_SIZE = images.WRONG_IMAGE_SIZE  # the image's or the segmentation's (the detail names the file)
UNSUPPORTED_IMAGE_MODE = images.UNSUPPORTED_IMAGE_MODE
MISSING_SEGMENTATION = "missing_segmentation"
CORRUPT_SEGMENTATION = "corrupt_segmentation"
UNSUPPORTED_SEGMENTATION_MODE = "unsupported_segmentation_mode"
MISSING_LANDMARKS = "missing_landmarks"
BAD_LANDMARKS = "bad_landmarks"
BOX_OFF_IMAGE = "box_off_image"


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is one of the codes above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class FaceSample:
    """Paths of one FaceSynthetics sample (files may be missing: readers say so)."""

    id: str
    image_path: Path
    segmentation_path: Path
    landmarks_path: Path


def sample_paths(root: str | Path, sample_id: str) -> FaceSample:
    """The three paths of sample ``sample_id`` under ``root``."""
    root = Path(root)
    return FaceSample(sample_id, root / f"{sample_id}.png", root / f"{sample_id}_seg.png", root / f"{sample_id}_ldmks.txt")


def list_samples(root: str | Path) -> list[FaceSample]:
    """Every sample id that has at least one of its three files under ``root``, sorted by id."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: run the fetch_facesynthetics stage first")
    ids = {m.group(1) for p in root.iterdir() if (m := _ID.match(p.name))}
    return [sample_paths(root, i) for i in sorted(ids)]


_AS_SEGMENTATION = {MISSING_IMAGE: MISSING_SEGMENTATION, CORRUPT_IMAGE: CORRUPT_SEGMENTATION,
                    UNSUPPORTED_IMAGE_MODE: UNSUPPORTED_SEGMENTATION_MODE}


def sample_error(exc: images.ImageError, segmentation: bool = False) -> SampleError:
    """The :class:`SampleError` for a bad image file (a segmentation's reasons say ``segmentation``)."""
    reason = _AS_SEGMENTATION.get(exc.reason, exc.reason) if segmentation else exc.reason
    return SampleError(reason, exc.detail)


def read_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """Decode an image to an HxWx3 uint8 RGB array (:func:`pipelines.images.to_rgb`), checking from its
    header that it is ``size`` x ``size``."""
    try:
        return images.read(path, None if size is None else (size, size), images.RGB)[0]
    except images.ImageError as exc:
        raise sample_error(exc) from exc


def read_segmentation(path: str | Path, size: int | None = None) -> np.ndarray:
    """Decode a ``_seg.png`` class-index map to an HxW uint8 array, checking it is ``size`` x ``size``."""
    try:
        return images.read(path, None if size is None else (size, size), images.LABELS)[0]
    except images.ImageError as exc:
        raise sample_error(exc, segmentation=True) from exc


def read_landmarks(path: str | Path, expected: int = NUM_SOURCE_LANDMARKS) -> np.ndarray:
    """Parse a ``_ldmks.txt`` file (one ``x y`` per line) into an (expected, 2) float32 array."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(MISSING_LANDMARKS, str(path))
    try:
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        pts = np.array([[float(x), float(y)] for x, y in rows], dtype=np.float32)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SampleError(BAD_LANDMARKS, f"{path.name}: not 'x y' per line ({exc})") from exc
    if pts.shape != (expected, 2):
        raise SampleError(BAD_LANDMARKS, f"{path.name}: {len(pts)} points, expected {expected}")
    if not np.isfinite(pts).all():
        raise SampleError(BAD_LANDMARKS, f"{path.name}: NaN or inf")
    return pts
