"""Small JSON reports with provenance, written the same way by every stage.

Reports live under ``reports/`` in git (``cache: false`` in dvc.yaml) so ``dvc metrics diff`` works across
commits. They carry no timestamps or host names, so an unchanged input gives a byte-identical report.
A report that dvc.yaml declares under ``metrics:`` is written by :func:`write_report` as two files: the
metrics file (numbers only, tens at most, so `dvc metrics show` stays readable) and its
``<name>.provenance.json`` sibling (models, packages, parameters, runtime, notes, breakdowns; not a metric).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
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


# --- metrics + provenance: the one way a stage writes a report that dvc.yaml declares as `metrics:` ----------

PROVENANCE_SUFFIX = ".provenance.json"
METRIC_MAX_DEPTH = 3  # key path length of a metric leaf: ``a``, ``a.b`` or ``a.b.c``
METRIC_MAX_LEAVES = 64  # "tens per file at most": more is a breakdown, which belongs in the provenance file
METRIC_KEY = re.compile(r"[A-Za-z0-9_+-]+")  # names, not text: no spaces (a prompt), no dots (dvc's separator)
STANDIN_FLAG = "uses_standin_models"  # the one flag: top level of every metrics file, nowhere in its details


class MetricsError(ValueError):
    """A metrics payload holds something that is not a number users compare."""


def provenance_path(path: str | Path) -> Path:
    """The sibling of a metrics file ``<dir>/<name>.json`` that holds its details: ``<dir>/<name>.provenance.json``."""
    path = Path(path)
    if path.suffix != ".json" or path.name.endswith(PROVENANCE_SUFFIX):
        raise ValueError(f"{path}: a metrics file is <name>.json (and not itself a {PROVENANCE_SUFFIX})")
    return path.with_name(path.stem + PROVENANCE_SUFFIX)


def metric_leaves(metrics: dict, ndigits: int = 6) -> dict[str, int | float | bool | None]:
    """``metrics`` flattened to ``{"a.b.c": leaf}`` (numpy scalars made python, floats rounded, NaN/inf None).

    Raises :class:`MetricsError` naming the key for a leaf that is not int, float, bool or None (text, a
    list), a key that is not a plain name, nesting deeper than ``METRIC_MAX_DEPTH``, a missing or non-bool
    top-level ``uses_standin_models``, or more than ``METRIC_MAX_LEAVES`` leaves.
    """
    if not isinstance(metrics, dict):
        raise MetricsError(f"metrics must be a dict, got {type(metrics).__name__}")
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: tuple[str, ...]) -> None:
        for key, value in node.items():
            path = (*prefix, str(key))
            name = ".".join(path)
            if not isinstance(key, str) or not METRIC_KEY.fullmatch(key):
                raise MetricsError(f"metrics key {name!r}: not a plain name ([A-Za-z0-9_+-]); a text breakdown "
                                   "belongs in the provenance file")
            if len(path) > METRIC_MAX_DEPTH:
                raise MetricsError(f"metrics key {name!r}: nested deeper than {METRIC_MAX_DEPTH} levels")
            if isinstance(value, dict):
                walk(value, path)
                continue
            value = _clean(value, ndigits)
            if value is not None and not isinstance(value, (bool, int, float)):
                raise MetricsError(f"metrics key {name!r}: {type(value).__name__} {value!r:.60} is not a number; "
                                   "put text, lists and per-item breakdowns in the provenance file")
            out[name] = value

    walk(metrics, ())
    if not isinstance(out.get("uses_standin_models"), bool):
        raise MetricsError("metrics need a top-level bool 'uses_standin_models' (stand-in runs must be obvious)")
    if len(out) > METRIC_MAX_LEAVES:
        raise MetricsError(f"{len(out)} metric values (at most {METRIC_MAX_LEAVES}): move breakdowns to the "
                           "provenance file")
    return out


def write_report(path: str | Path, metrics: dict, details: dict, ndigits: int = 6) -> tuple[Path, Path]:
    """Write a stage's report as two files: ``path`` (a dvc ``metrics:`` file) with only ``metrics``, the
    numbers users compare plus ``uses_standin_models``, checked by :func:`metric_leaves`; and
    :func:`provenance_path` (not a metric) with ``details``: models, packages, parameters, runtime, notes,
    implementation strings, per-item breakdowns. Both with :func:`write_json` (atomic, key-sorted, rounded,
    no timestamps); nothing is written when ``metrics`` is rejected. Returns ``(metrics_path, details_path)``.
    """
    metric_leaves(metrics, ndigits)
    flag = _find_key(details, STANDIN_FLAG)
    if flag is not None:
        raise MetricsError(f"details hold {flag!r}: {STANDIN_FLAG} is one flag, at the top of the metrics")
    path = Path(path)
    details_path = write_json(provenance_path(path), details, ndigits)
    return write_json(path, metrics, ndigits), details_path


def _find_key(node: Any, key: str, prefix: str = "") -> str | None:
    """The dotted path of the first ``key`` anywhere in ``node`` (dicts and lists), or None."""
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{prefix}.{k}" if prefix else str(k)
            if k == key:
                return here
            found = _find_key(v, key, here)
            if found:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _find_key(v, key, f"{prefix}[{i}]")
            if found:
                return found
    return None


def split_report(report: dict, metric_keys: Iterable[str]) -> tuple[dict, dict]:
    """``(metrics, details)`` of a full report: ``metric_keys`` are dotted paths into it (``"rows"`` takes
    the whole sub-dict, ``"fid.value"`` one number); metrics hold those, details all the rest (emptied
    sub-dicts dropped), so each report is built whole in one place and split by the list of numbers users
    compare. A path through a None (an absent section) gives None; a path that is not there is a KeyError.
    """
    details = copy.deepcopy(report)
    metrics: dict[str, Any] = {}
    for key in metric_keys:
        parts = key.split(".")
        src, dst, parents = details, metrics, []
        for part in parts[:-1]:
            if src is not None:
                if not isinstance(src, dict) or part not in src:
                    raise KeyError(f"metric {key!r}: the report has no {part!r}")
                parents.append((src, part))
                src = src[part]
            dst = dst.setdefault(part, {})
        if src is None:
            dst[parts[-1]] = None
            continue
        if not isinstance(src, dict) or parts[-1] not in src:
            raise KeyError(f"metric {key!r}: the report has no {parts[-1]!r}")
        dst[parts[-1]] = src.pop(parts[-1])
        for parent, part in reversed(parents):  # drop the sub-dicts this emptied
            if parent[part] == {}:
                del parent[part]
    return metrics, details


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_report(path: str | Path) -> dict:
    """A report written by :func:`write_report`, both files merged back into one dict (sub-dicts merged;
    the inverse of :func:`split_report`); a report without a provenance file is read alone."""
    path = Path(path)
    details = provenance_path(path)
    return _merge(read_json(details) if details.is_file() else {}, read_json(path))
