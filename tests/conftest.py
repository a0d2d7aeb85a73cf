"""Shared test setup: no network, quiet progress bars, the repo root on sys.path."""
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reports one CUDA device: the real profile's machine, for parsing its configs here (the config layer
    refuses fp16 on a CPU; nothing touches CUDA while parsing)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.fixture
def fresh_accelerate():
    """accelerate's process-global state reset before and after the test (each in-process training run builds its
    own Accelerator)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


def committed_params_text(repo: Path = REPO_ROOT) -> str:
    """params.yaml as git holds it (``git show :params.yaml``: the committed file, or a change you staged with
    ``git add``), never the working copy: a user's applied experiment (`dvc exp apply`, an edited profile) must
    not change what the tests check. Outside a git checkout (an unpacked archive) the file on disk is all there is."""
    import subprocess

    try:
        return subprocess.run(["git", "show", ":params.yaml"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return (repo / "params.yaml").read_text()


def committed_params(repo: Path = REPO_ROOT) -> dict:
    """The committed params.yaml, parsed (a fresh dict each call: tests edit it)."""
    import yaml

    return yaml.safe_load(committed_params_text(repo))


def write_committed_params(dest: Path) -> Path:
    """Write the committed params.yaml to ``dest`` (a file, or a folder that gets params.yaml)."""
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / "params.yaml"
    dest.write_text(committed_params_text())
    return dest
