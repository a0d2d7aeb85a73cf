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


def _sd_base(dest: Path, seed: int) -> tuple[str, Path]:
    from pipelines.generation import build_sd_standin

    return "standin/stable-diffusion-tiny", build_sd_standin(dest, seed=seed)


def _controlnet(dest: Path, seed: int) -> tuple[str, Path]:
    from pipelines.generation import build_controlnet_standin

    return "standin/controlnet-tiny", build_controlnet_standin(dest, seed=seed)


def _inception(dest: Path, seed: int) -> tuple[str, Path]:
    from pipelines.metrics.fid import INCEPTION_FILE, build_inception_standin

    return INCEPTION_FILE, build_inception_standin(dest / INCEPTION_FILE, seed=seed)


def _clip(dest: Path, seed: int) -> tuple[str, Path]:
    from pipelines.metrics.clip_score import build_clip_standin

    return "standin/clip-tiny", build_clip_standin(dest, seed=seed)


#: model role -> builder(dest_dir, seed) -> (id, path written)
BUILDERS: dict[str, Callable[[Path, int], tuple[str, Path]]] = {
    "spiga": _spiga, "blip": _blip, "sd_base": _sd_base, "controlnet": _controlnet, "inception": _inception,
    "clip": _clip,
}


def build_standin(role: str, dest: str | Path, seed: int = 0) -> tuple[str, Path]:
    """Build the stand-in for ``role`` (``spiga`` or ``blip``) into directory ``dest``."""
    if role not in BUILDERS:
        raise ValueError(f"no stand-in for model role {role!r}; known: {', '.join(BUILDERS)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return BUILDERS[role](dest, seed)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2/CLIP), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_clip_tokenizer(dest: str | Path, model_max_length: int = 77) -> Path:
    """A ``CLIPTokenizer`` built offline: byte-level BPE with the 512 single-byte tokens and no merges.

    Same class, files and special tokens as the real CLIP tokenizers (``vocab.json``, ``merges.txt``,
    ``<|startoftext|>``, ``<|endoftext|>``), so text encoders and CLIP scorers load it with
    ``from_pretrained`` like the real one; text becomes one token per character. Vocabulary size 514.
    """
    import json

    from transformers import CLIPTokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    chars = _byte_symbols()
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    tok.save_pretrained(dest)
    (dest / "vocab.json").write_text(json.dumps(vocab))  # the slow-tokenizer files too, as real repos ship them
    (dest / "merges.txt").write_text("#version: 0.2\n")
    return dest
