"""Stand-in models: the real architectures with random weights, built by code and saved like the real
checkpoints, so the offline sample run and the tests load them through the same loaders as real weights.

Their compute equals the real models' where the real size is used (SPIGA), so throughput measured with
them is honest; their outputs (landmarks, captions) mean nothing, and every report made with them says so.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

STANDIN_NOTE = "random weights of the real architecture, built by code: outputs are meaningless, speed is real"


def _spiga(dest: Path, seed: int) -> tuple[str, Path]:
    from pipelines.faces.spiga import build_spiga_standin

    name = "spiga_300wpublic.pt"
    return name, build_spiga_standin(dest / name, seed=seed)


def _blip(dest: Path, seed: int) -> tuple[str, Path]:
    from pipelines.captions import build_blip_standin

    return "standin/blip-tiny", build_blip_standin(dest, seed=seed)


#: model role -> builder(dest_dir, seed) -> (id, path written)
BUILDERS: dict[str, Callable[[Path, int], tuple[str, Path]]] = {"spiga": _spiga, "blip": _blip}


def build_standin(role: str, dest: str | Path, seed: int = 0) -> tuple[str, Path]:
    """Build the stand-in for ``role`` (``spiga`` or ``blip``) into directory ``dest``."""
    if role not in BUILDERS:
        raise ValueError(f"no stand-in for model role {role!r}; known: {', '.join(BUILDERS)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return BUILDERS[role](dest, seed)
