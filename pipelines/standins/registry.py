"""Which stand-in builds which model role: ``BUILDERS`` and :func:`build_standin` (used by the fetch stages)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _spiga(dest: Path, seed: int) -> tuple[str, Path]:
    from pipelines.standins.spiga import WEIGHTS_FILE, build_spiga_standin

    return WEIGHTS_FILE, build_spiga_standin(dest / WEIGHTS_FILE, seed=seed)


def _blip(dest: Path, seed: int) -> tuple[str, Path]:
    from pipelines.standins.blip import build_blip_standin

    return "standin/blip-tiny", build_blip_standin(dest, seed=seed)


def _sd_base(dest: Path, seed: int) -> tuple[str, Path]:
    from pipelines.standins.stable_diffusion import build_sd_standin

    return "standin/stable-diffusion-tiny", build_sd_standin(dest, seed=seed)


def _controlnet(dest: Path, seed: int) -> tuple[str, Path]:
    from pipelines.standins.stable_diffusion import build_controlnet_standin

    return "standin/controlnet-tiny", build_controlnet_standin(dest, seed=seed)


def _inception(dest: Path, seed: int) -> tuple[str, Path]:
    from pipelines.standins.inception import INCEPTION_FILE, build_inception_standin

    return INCEPTION_FILE, build_inception_standin(dest / INCEPTION_FILE, seed=seed)


def _clip(dest: Path, seed: int) -> tuple[str, Path]:
    from pipelines.standins.clip import build_clip_standin

    return "standin/clip-tiny", build_clip_standin(dest, seed=seed)


#: model role -> builder(dest_dir, seed) -> (id, path written)
BUILDERS: dict[str, Callable[[Path, int], tuple[str, Path]]] = {
    "spiga": _spiga, "blip": _blip, "sd_base": _sd_base, "controlnet": _controlnet, "inception": _inception,
    "clip": _clip,
}


def build_standin(role: str, dest: str | Path, seed: int = 0) -> tuple[str, Path]:
    """Build the stand-in for ``role`` (a key of :data:`BUILDERS`) into directory ``dest``."""
    if role not in BUILDERS:
        raise ValueError(f"no stand-in for model role {role!r}; known: {', '.join(BUILDERS)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return BUILDERS[role](dest, seed)

