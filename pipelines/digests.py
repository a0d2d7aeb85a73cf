"""Content hashes of files and folders: what a model's manifest pins and a training run's fingerprint holds.

Its own small module so that hashing a dataset (training) or a card (publish) does not pull in the model store's
download and stand-in code (and with it their dvc.yaml deps).
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.load`` runs the code it holds), read without loading it."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") for n in zf.namelist())


def _torchscript_weights_digest(path: Path) -> str | None:
    """SHA-256 of a TorchScript archive's parameters and buffers (names, dtypes, shapes, bytes), or None when
    ``path`` is not TorchScript. The archive's own bytes are not stable: ``torch.jit.save`` writes a random
    serialization id and source paths, so equal weights would get different file hashes."""
    import torch

    if not is_torchscript(path):
        return None
    h = hashlib.sha256()
    for name, t in sorted(torch.jit.load(str(path), map_location="cpu").state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tree_digest(root: str | Path) -> str:
    """SHA-256 over the relative paths and contents of every file under ``root`` (manifest excluded).

    A file's content is its bytes, except for TorchScript archives, whose weights are hashed instead.
    """
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.name != "facecontrol_model.json"):
        h.update(str(p.relative_to(root)).encode())
        content = _torchscript_weights_digest(p) if p.suffix == ".pt" else None
        h.update((content or sha256_file(p)).encode())
    return h.hexdigest()
