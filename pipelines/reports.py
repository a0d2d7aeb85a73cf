"""Small JSON reports with provenance, written the same way by every stage.

Reports live under ``reports/`` in git (``cache: false`` in dvc.yaml) so ``dvc metrics diff`` works across
commits. They carry no timestamps or host names, so an unchanged input gives a byte-identical report.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

MODEL_MANIFEST = "facecontrol_model.json"


@dataclass(frozen=True)
class ModelInfo:
    """What a report says of a model: which one, which revision, and whether it is real."""

    name: str  # role in the pipeline: spiga, blip, ...
    id: str  # hub id or weights file name
    revision: str  # hub commit / file sha256
    source: str  # where it came from (URL, hub id, or 'built by code')
    standin: bool  # True: random weights of the real architecture; its outputs mean nothing
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def write_model_manifest(model_dir: str | Path, info: ModelInfo) -> Path:
    """Store ``info`` beside the weights so every consumer can report it."""
    path = Path(model_dir) / MODEL_MANIFEST
    write_json(path, info.to_dict())
    return path


def read_model_manifest(model_dir: str | Path) -> ModelInfo:
    """Read the manifest written by :func:`write_model_manifest`; a clear error when it is missing."""
    path = Path(model_dir) / MODEL_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {model_dir} was not made by the fetch_models stage")
    return ModelInfo(**json.loads(path.read_text()))


def package_versions(names: tuple[str, ...] = ("torch", "transformers", "datasets", "diffusers", "spiga", "numpy")) -> dict:
    """Installed versions of the packages that can change a result (absent ones are skipped)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _clean(value: Any, ndigits: int) -> Any:
    """Round floats (stable diffs), turn NaN/inf into None (valid JSON), and numpy scalars into python."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return round(value, ndigits) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v, ndigits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, ndigits) for v in value]
    return value


def write_json(path: str | Path, payload: dict, ndigits: int = 6) -> Path:
    """Write ``payload`` as indented, key-sorted JSON, atomically (a killed run leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(payload, ndigits), indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports and manifests are meant to be read by others
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> dict:
    """Read a JSON file written by :func:`write_json`."""
    return json.loads(Path(path).read_text())


def provenance(models: list[ModelInfo], runtime: dict | None = None, params: dict | None = None) -> dict:
    """The block every report carries: models (real or stand-in), package versions, runtime, parameters."""
    block: dict[str, Any] = {
        "models": {m.name: m.to_dict() for m in models},
        "uses_standin_models": any(m.standin for m in models),
        "packages": package_versions(),
    }
    if runtime is not None:
        block["runtime"] = runtime
    if params is not None:
        block["params"] = params
    return block
