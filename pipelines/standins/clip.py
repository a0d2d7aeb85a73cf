"""Stand-in for the CLIP scorer's model (``openai/clip-vit-large-patch14``): a tiny ``CLIPModel`` of random
weights with the real image processor and the offline tokenizer, saved with ``save_pretrained`` so
:func:`pipelines.metrics.clip_score.load_clip` loads it like the real snapshot."""
from __future__ import annotations

from pathlib import Path

import torch


def build_clip_standin(dest: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``CLIPModel`` + ``CLIPProcessor`` to ``dest`` with ``save_pretrained``.

    The image processor is ``CLIPImageProcessor()`` with the real CLIP settings (shortest edge 224,
    centre crop 224, bicubic, OpenAI mean/std); the tokenizer is
    :func:`pipelines.standins.tokenizers.build_clip_tokenizer` (one token per character, 77 positions).
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pipelines.standins.tokenizers import build_clip_tokenizer, load_clip_tokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    build_clip_tokenizer(dest)
    tokenizer = load_clip_tokenizer(dest)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77, **special},
        vision_config={"image_size": 224, "patch_size": 32, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(dest)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(dest)
    return dest
