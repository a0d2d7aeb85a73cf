"""Stage fetch_models: SPIGA and BLIP weights into data/models/<role>/, each with a manifest.

sample profile: stand-ins (real architectures, random weights) built by code, no network.
real profile: SPIGA 300W-public from its official URL, BLIP from the Hugging Face Hub (pinned commit).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipelines.model_store import fetch_hub_snapshot, fetch_weights_file, make_standin
from stages import config as C

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

    def validate(self, prefix: str) -> None:
        if self.source == "url" and not (self.url and self.id):
            raise C.ParamError(f"{prefix}: source 'url' needs 'url' and 'id' (the weights file name)")
        if self.source == "hub" and not (self.id and self.revision):
            raise C.ParamError(f"{prefix}: source 'hub' needs 'id' (repo id) and 'revision'")


@dataclass(frozen=True)
class FetchModelsConfig:
    spiga: ModelSource
    blip: ModelSource

    def validate(self, prefix: str) -> None:
        if self.spiga.source == "hub":
            raise C.ParamError(f"{prefix}.spiga.source: SPIGA weights are not on the Hub; use 'url' or 'standin'")


def fetch(role: str, src: ModelSource, seed: int) -> str:
    dest = MODELS_DIR / role
    if src.source == "standin":
        info = make_standin(role, dest, seed)
    elif src.source == "url":
        info = fetch_weights_file(role, src.url, src.id, dest, CACHE_DIR, sha256=src.sha256)
    else:
        info = fetch_hub_snapshot(role, src.id, src.revision, dest)
    kind = "STAND-IN (random weights)" if info.standin else "real"
    return f"{role}: {info.id} @ {info.revision[:12]} [{kind}]"


def main(argv: list[str] | None = None) -> None:
    args = C.cli(__doc__, argv)
    base, cfg = C.load(FetchModelsConfig, "fetch_models", C.read_params(args.params), args.profile)
    for role in ("spiga", "blip"):
        print(fetch(role, getattr(cfg, role), base.seed))


if __name__ == "__main__":
    C.run(main)
