"""Reading a stage's params: the profile switch, declared keys, validation, and ``--help``.

Every key of params.yaml is written once. A value that differs by profile is a mapping of exactly
``{sample: ..., real: ...}``; ``base.profile`` picks one (at any depth). So ``dvc exp run -S section.key=v``
replaces the key in every profile and always takes effect, and ``-S section.key.real=v`` changes one profile.

A stage reads only the keys it declares (``PARAMS`` in its module; dvc.yaml lists the same keys, which a test
checks), so a change elsewhere in params.yaml never re-runs it. Each stage declares its options as a dataclass;
:func:`parse` rejects unknown or missing keys and values outside a ``Literal`` before any work starts, naming
the key and the allowed values.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable, Iterable
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
    """The ``base`` section shared by all stages; a key the stage does not declare stays ``None``."""

    profile: Literal["sample", "real"] | None = None
    seed: int | None = None
    device: str | None = None  # auto | cpu | cuda | cuda:N | mps
    image_size: int | None = None
    launcher: str | None = None  # how dvc.yaml starts GPU stages: python, or 'accelerate launch --multi_gpu'

    def validate(self, prefix: str = "base") -> None:
        """A positive image size and a device this machine has (``cuda:7`` on a one-GPU machine is refused)."""
        if self.image_size is not None:
            positive(prefix, image_size=self.image_size)
        if self.device is not None:
            resolved_device(self.device, f"{prefix}.device")


#: The one precision vocabulary of every stage's ``precision`` (and ``mixed_precision``) key: ``auto`` is fp16 on
#: CUDA and fp32 elsewhere (pipelines.runtime.resolve_precision).
Precision = Literal["auto", "fp32", "fp16", "bf16"]
MixedPrecision = Literal["fp32", "fp16", "bf16"]  # training: chosen explicitly, no auto


def resolved_device(name: str, key: str = "base.device") -> Any:
    """``name`` as the torch device this machine gives it (``auto`` resolved); a :class:`ParamError` naming ``key``
    for a device that is not one of auto, cpu, cuda, cuda:N, mps, or that this machine does not have."""
    from pipelines.devices import resolve_device

    if not isinstance(name, str):
        raise ParamError(f"{key}: expected a device name, got {name!r}")
    try:
        return resolve_device(name)
    except ValueError as exc:
        raise ParamError(f"{key}: {exc}") from None


def check_precision(key: str, precision: str, device: str, device_key: str = "base.device") -> None:
    """Refuse fp16 on the CPU (``device`` resolved): autocast there is either unsupported or many times slower
    than fp32, so a run would record fp16 while computing something else, or crawl. bf16 runs on the CPU."""
    if precision == "fp16" and resolved_device(device, device_key).type == "cpu":
        raise ParamError(f"{key}: fp16 needs a GPU, and {device_key}={device!r} runs on the CPU here; "
                         "use auto (fp32 on the CPU), fp32 or bf16")


def training_device(device: str, stage: str) -> Any:
    """The device ``stage``'s training loop runs on for ``base.device``, resolved by the one resolver
    (:func:`resolved_device`: ``auto`` is the GPU when there is one). A :class:`ParamError` names base.device for
    a device accelerate does not train on here (mps), or for one GPU (``cuda:N``) when several processes were
    launched (each takes its own local rank's GPU). In one process an explicit ``cuda:N`` is made the current
    CUDA device, which is the one accelerate's ``cuda`` then means."""
    import os

    import torch

    dev = resolved_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ParamError(f"base.device: {device!r} is {dev.type} here; {stage} trains on cpu or cuda (via accelerate)")
    if ":" in device:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ParamError(f"base.device: {device!r} names one GPU, but {stage} was launched as several processes "
                             "(each takes its own GPU): use cuda or auto")
        torch.cuda.set_device(dev)
    return dev


def read_params(path: str | Path = PARAMS_FILE, keys: Iterable[str] | None = None) -> dict:
    """Load params.yaml (or another file with the same layout); with ``keys`` (dotted: a section or one key in
    it), only those, so a stage cannot read what it did not declare. A declared key missing from the file is a
    :class:`ParamError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run stages from the repository root")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(params, dict):
        raise ParamError(f"{path}: expected a mapping of sections at the top, got {type(params).__name__}")
    return params if keys is None else declared(params, keys, str(path))


def declared(params: dict, keys: Iterable[str], where: str = PARAMS_FILE) -> dict:
    """Only the dotted ``keys`` of ``params`` (a section, or one key in it); a missing one is a
    :class:`ParamError` naming it."""
    out: dict = {}
    for key in keys:
        node, parts = params, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise ParamError(f"{where} has no {'.'.join(parts[:i + 1])} (declared as {key!r})")
            node = node[part]
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = node
    return out


def is_per_profile(value: Any) -> bool:
    """Whether ``value`` is a per-profile value: a mapping of exactly ``{sample: ..., real: ...}``."""
    return isinstance(value, dict) and set(value) == set(PROFILES)


def resolve(value: Any, profile: str | None, key: str) -> Any:
    """``value`` with every per-profile mapping in it replaced by its ``profile`` entry."""
    if is_per_profile(value):
        if profile is None:
            raise ParamError(f"{key}: differs by profile, but the stage does not declare base.profile")
        return resolve(value[profile], profile, key)
    if isinstance(value, dict):
        return {k: resolve(v, profile, f"{key}.{k}") for k, v in value.items()}
    return value


def section(params: dict, name: str, profile: str | None) -> dict:
    """The section ``name`` with its per-profile values resolved for ``profile``."""
    if profile is not None and profile not in PROFILES:
        raise ParamError(f"base.profile: {profile!r} is not one of {', '.join(PROFILES)}")
    if name not in params:
        raise ParamError(f"params section {name!r} is missing or not declared by this stage")
    return resolve(dict(params[name] or {}), profile, name)


def value(params: dict, key: str, profile: str | None) -> Any:
    """One dotted key (``section.key``) resolved for ``profile``."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamError(f"params key {key!r} is missing or not declared by this stage")
        node = node[part]
    return resolve(node, profile, key)


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
    if tp in (int, float) and isinstance(value, bool):
        raise ParamError(f"{key}: expected {tp.__name__}, got {value!r}")
    if tp is float and isinstance(value, (int, float)):
        if not math.isfinite(value):  # .inf trains NaN, .nan skips every face: never a useful setting
            raise ParamError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
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


def load_base(params: dict, profile: str | None = None) -> Base:
    """Parse the declared keys of ``base``; ``profile`` (the ``--profile`` option) overrides base.profile."""
    values = dict(params.get("base") or {})
    if profile is not None:
        values["profile"] = profile
    return parse(Base, values, "base")


def load(cls: type[T], name: str, params: dict, profile: str | None = None) -> tuple[Base, T]:
    """Parse ``base`` and the stage section ``name`` for ``profile`` (default: ``base.profile``).

    A schema whose fields come partly from other sections says so in ``FROM_OTHER_SECTIONS`` (field -> dotted
    key); those keys are resolved for the same profile (the stage declares them in its PARAMS).
    A field typed :data:`Precision` or :data:`MixedPrecision` is checked against ``base.device`` (when the stage
    declares it) by :func:`check_precision`, the same for every stage."""
    base = load_base(params, profile)
    values = section(params, name, base.profile)
    for field, key in getattr(cls, "FROM_OTHER_SECTIONS", {}).items():
        values[field] = value(params, key, base.profile)
    cfg = parse(cls, values, name)
    if base.device is not None:
        for field, tp in typing.get_type_hints(cls).items():
            if tp in (Precision, MixedPrecision):
                check_precision(f"{name}.{field}", getattr(cfg, field), base.device)
    return base, cfg


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


def model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model NAME``: an entry of ``controlnets`` in params.yaml (generate and evaluate take it; dvc.yaml runs
    one stage per name)."""
    parser.add_argument("--model", required=True, metavar="NAME",
                        help="a model name from controlnets in params.yaml (dvc.yaml runs one stage per name)")


def positive(prefix: str, **values: float) -> None:
    """Raise :class:`ParamError` naming the first value that is not > 0."""
    for k, v in values.items():
        if v is None or v <= 0:
            raise ParamError(f"{prefix}.{k}: must be > 0, got {v!r}")


def non_negative(prefix: str, **values: float) -> None:
    """Raise :class:`ParamError` naming the first value that is not >= 0 (None passes: an optional key)."""
    for k, v in values.items():
        if v is not None and v < 0:
            raise ParamError(f"{prefix}.{k}: must be >= 0, got {v!r}")


def run(main: Callable[[], object]) -> None:
    """Run a stage's ``main`` from the command line: expected failures (a bad parameter, a missing input,
    a failed download or upload, a folder it cannot write, a full disk) print one clear line and exit 2 instead
    of a traceback."""
    from pipelines.errors import PipelineError

    try:
        main()
    except (ParamError, FileNotFoundError, PipelineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:  # read-only folder, full disk, ...: the path and the reason, not a traceback
        if exc.filename is None:
            raise
        print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(2) from None
