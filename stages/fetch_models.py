"""Stage fetch_models: model weights into data/models/<role>/, each with a manifest (id, revision, real or stand-in).

Every key of the params section is a model role (spiga, blip, sd_base, controlnet, inception, clip, ...).
sample profile: stand-ins (real architectures, random weights) built by code, no network.
real profile: weights files from their official URL (resumable, SHA-256 verified when pinned, recorded always; a
TorchScript file is refused until its sha256 is pinned: it is executable code), Hub repos pinned to the
commit their revision resolves to. `--section` picks the params section (dvc.yaml runs one stage per group).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipelines.model_store import fetch_hub_snapshot, fetch_weights_file, make_standin
from pipelines.standins.registry import BUILDERS
from stages import config as C

# the params keys this stage reads for --section S (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("base.profile", "base.seed", "{section}")
MODELS_DIR = Path("data/models")
CACHE_DIR = Path("data/cache/models")


@dataclass(frozen=True)
class ModelSource:
    """Where one model comes from."""

    source: Literal["standin", "url", "hub"]
    id: str | None = None  # url: weights file name; hub: repo id
    url: str | None = None
    revision: str | None = None
    sha256: str | None = None
    allow_patterns: list[str] | None = None  # hub: the files to fetch (default: configs, tokenizers, safetensors)

    def validate(self, prefix: str) -> None:
        if self.source == "url" and not (self.url and self.id):
            raise C.ParamError(f"{prefix}: source 'url' needs 'url' and 'id' (the weights file name)")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256):
            raise C.ParamError(f"{prefix}.sha256: expected 64 hex digits or null, got {self.sha256!r}")
        if self.source == "hub" and not (self.id and self.revision):
            raise C.ParamError(f"{prefix}: source 'hub' needs 'id' (repo id) and 'revision'")


def parse_models(section: dict, name: str) -> dict[str, ModelSource]:
    """role -> ModelSource for every key of the merged section; stand-ins must exist for the role."""
    if not section:
        raise C.ParamError(f"{name}: no models listed")
    models = {}
    for role, values in section.items():
        if not isinstance(values, dict):
            raise C.ParamError(f"{name}.{role}: expected a mapping with 'source', got {values!r}")
        src = C.parse(ModelSource, values, f"{name}.{role}")
        if src.source == "standin" and role not in BUILDERS:
            raise C.ParamError(f"{name}.{role}.source: no stand-in exists for role {role!r}; known: {', '.join(BUILDERS)}")
        if role == "spiga" and src.source == "hub":
            raise C.ParamError(f"{name}.spiga.source: SPIGA weights are not on the Hub; use 'url' or 'standin'")
        models[role] = src
    return models


def fetch(role: str, src: ModelSource, seed: int) -> str:
    """Put model ``role`` into data/models/<role>/ and return a one-line description."""
    dest = MODELS_DIR / role
    if src.source == "standin":
        info = make_standin(role, dest, seed)
    elif src.source == "url":
        info = fetch_weights_file(role, src.url, src.id, dest, CACHE_DIR, sha256=src.sha256)
    else:
        info = fetch_hub_snapshot(role, src.id, src.revision, dest, CACHE_DIR, allow_patterns=src.allow_patterns)
    kind = "STAND-IN (random weights)" if info.standin else "real"
    return f"{role}: {info.id} @ {info.revision[:12]} [{kind}]"


def load_config(params: dict, section: str, profile: str | None = None) -> tuple[C.Base, dict[str, ModelSource]]:
    """Parse ``base`` and the models of ``section`` for ``profile`` (default: base.profile)."""
    base = C.load_base(params, profile)
    return base, parse_models(C.section(params, section, base.profile), section)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=C.PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--profile", choices=C.PROFILES, default=None, help="override base.profile for this run")
    parser.add_argument("--section", default="fetch_models", help="params section listing the models (default: %(default)s)")
    args = parser.parse_args(argv)
    base, models = load_config(C.read_params(args.params, [k.format(section=args.section) for k in PARAMS]), args.section,
                               args.profile)
    for role, src in models.items():
        print(fetch(role, src, base.seed))


if __name__ == "__main__":
    C.run(main)
