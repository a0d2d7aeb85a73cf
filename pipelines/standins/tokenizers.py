"""The offline CLIP tokenizer of the stand-ins (the SD text encoder's and the CLIP scorer's): built by code,
saved like the real one, no download."""
from __future__ import annotations

from pathlib import Path


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


def load_clip_tokenizer(path: str | Path):
    """The tokenizer :func:`build_clip_tokenizer` wrote, loaded for saving again inside a stand-in: without the
    load-time options ``from_pretrained`` records (``local_files_only`` follows ``HF_HUB_OFFLINE``), so the
    stand-in's files, and so its revision and DVC hash, do not depend on the environment that built it."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(path))
    tokenizer.init_kwargs.pop("local_files_only", None)
    return tokenizer

