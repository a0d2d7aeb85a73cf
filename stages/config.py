"""Reading a stage's section of params.yaml: the profile switch, validation, and ``--help``.

Every stage section may hold keys shared by all profiles plus one sub-section per profile
(``sample:`` and ``real:``) whose keys override the shared ones. ``base.profile`` picks the profile:
that one key is the switch between the offline sample and the real configuration.

Each stage declares its options as a dataclass; :func:`parse` rejects unknown or missing keys and
values outside a ``Literal`` before any work starts, naming the key and the allowed values.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

PROFILES = ("sample", "real")
PARAMS_FILE = "params.yaml"
T = TypeVar("T")


class ParamError(ValueError):
    """A bad value in params.yaml, named by its dotted key."""


@dataclasses.dataclass(frozen=True)
class Base:
    """The ``base`` section shared by all stages."""

    profile: Literal["sample", "real"]
    seed: int
    device: str  # auto | cpu | cuda | cuda:N | mps
    image_size: int
    launcher: str  # how dvc.yaml starts GPU stages: python, or 'accelerate launch --multi_gpu'


def read_params(path: str | Path = PARAMS_FILE) -> dict:
    """Load params.yaml (or another file with the same layout)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run stages from the repository root")
    return yaml.safe_load(path.read_text()) or {}


def section(params: dict, name: str, profile: str) -> dict:
    """The section ``name`` with the ``profile`` sub-section merged over the shared keys."""
    if profile not in PROFILES:
        raise ParamError(f"base.profile: {profile!r} is not one of {', '.join(PROFILES)}")
    if name not in params:
        raise ParamError(f"params.yaml has no section {name!r}")
    raw = dict(params[name] or {})
    merged = {k: v for k, v in raw.items() if k not in PROFILES}
    for k, v in (raw.get(profile) or {}).items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    return merged


def _check(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ParamError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check(key, value, arg)
            except ParamError as exc:
                errors.append(str(exc))
        raise ParamError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamError(f"{key}: expected a mapping, got {value!r}")
        return parse(tp, value, key)
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ParamError(f"{key}: expected a list, got {value!r}")
        return [_check(f"{key}[{i}]", v, arg) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ParamError(f"{key}: expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ParamError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def parse(cls: type[T], values: dict, prefix: str) -> T:
    """Build the dataclass ``cls`` from ``values``, checking every key and value."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamError(f"{prefix}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in values:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ParamError(f"{key} is missing")
        kwargs[name] = _check(key, values[name], hints[name])
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check(prefix)
    return obj


def load(cls: type[T], name: str, params: dict | None = None, profile: str | None = None) -> tuple[Base, T]:
    """Parse ``base`` and the stage section ``name`` for ``profile`` (default: ``base.profile``)."""
    params = read_params() if params is None else params
    if "base" not in params:
        raise ParamError("params.yaml has no section 'base'")
    base_values = dict(params["base"])
    if profile is not None:
        base_values["profile"] = profile
    base = parse(Base, base_values, "base")
    return base, parse(cls, section(params, name, base.profile), name)


def cli(description: str, argv: list[str] | None = None,
        configure: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The common command line of a stage: ``--params`` and ``--profile`` (``--help`` explains both), plus
    whatever ``configure`` adds to the parser."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Options come from params.yaml (base + this stage's section); "
                                            "base.profile switches between the offline 'sample' and the 'real' configuration.")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--profile", choices=PROFILES, default=None, help="override base.profile for this run")
    if configure is not None:
        configure(parser)
    return parser.parse_args(argv)


def positive(prefix: str, **values: float) -> None:
    """Raise :class:`ParamError` naming the first value that is not > 0."""
    for k, v in values.items():
        if v is None or v <= 0:
            raise ParamError(f"{prefix}.{k}: must be > 0, got {v!r}")


def run(main: Callable[[], object]) -> None:
    """Run a stage's ``main`` from the command line: expected failures (a bad parameter, a missing input,
    a failed download or upload) print one clear line and exit 2 instead of a traceback."""
    from pipelines.errors import PipelineError

    try:
        main()
    except (ParamError, FileNotFoundError, PipelineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
