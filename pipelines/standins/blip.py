"""Stand-in for ``Salesforce/blip-image-captioning-large``: the real ``BlipForConditionalGeneration`` and
``BlipProcessor`` at tiny size, random weights, the real image processor settings and a BERT WordPiece tokenizer
built locally, saved with ``save_pretrained`` so :meth:`pipelines.captions.BlipCaptioner.load` reads it like the
real snapshot. Its captions are gibberish.
"""
from __future__ import annotations

from pathlib import Path

import torch

# The real model's image processor: 384 px, bicubic, OpenAI CLIP mean/std.
BLIP_IMAGE_SIZE = 384
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


_WORDS = """
a an the of on in with and at to from by near its his her their this that man woman person boy girl
child old young face head hair eyes eye nose mouth lips smile smiling looking camera close up
closeup portrait picture photo image render rendering drawing painting 3d computer generated
wearing hat glasses sunglasses beard mustache earring earrings necklace shirt jacket scarf mask
headband cap helmet hood short long curly straight blonde brown black white red blue green gray
grey dark light bald pink purple orange yellow background wall sky studio room street table
standing sitting posing staring tilted turned side front profile view left right up down big small
tattoo makeup freckles wrinkles skin tan pale cheek chin forehead ear ears teeth tongue open closed
expression serious sad happy angry surprised neutral face's very is are has have there two one
""".split()


def _standin_vocab(n_words: int = 300) -> list[str]:
    """BERT-style WordPiece vocab: specials at BERT's order, caption-ish words, then filler syllables."""
    words = list(dict.fromkeys(_WORDS))
    syll = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    filler = (a + b for a in syll for b in syll)  # 4900 two-syllable nonsense words
    while len(words) < n_words:
        w = next(filler)
        if w not in words:
            words.append(w)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words[:n_words] + list(".,'!?-")


def build_blip_standin(path: str | Path, seed: int = 0) -> Path:
    """Save a TINY random-weight ``BlipForConditionalGeneration`` + ``BlipProcessor`` into ``path``.

    The real classes and the real image processor settings (384 px, OpenAI CLIP mean/std), a small BERT
    WordPiece tokenizer built locally (no download) with BLIP's token layout: ``[PAD]`` is the pad id,
    ``[SEP]`` ends a caption, ``[DEC]`` (an added special token, like id 30522 in the real model) is bos,
    ``[ENC]`` an extra special token. Like the real snapshot it saves no generation settings, so generation uses
    transformers' defaults exactly as for the real model (greedy, 20 tokens after ``[DEC]``). Weights are drawn
    with ``initializer_range`` 0.5 so that different images give different captions.
    Its captions are gibberish strings of vocabulary words: only for testing plumbing and throughput.
    """
    from transformers import (
        BertTokenizerFast,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(_standin_vocab())}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})

    config = standin_config(tokenizer)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(str(path))
    image_processor = BlipImageProcessor(size={"height": BLIP_IMAGE_SIZE, "width": BLIP_IMAGE_SIZE},
                                         image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                                         do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
                                         resample=3)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(path))
    return path


def _token_ids(tokenizer: object) -> dict:
    """BLIP text-config token ids from a tokenizer laid out like the real one."""
    sep = tokenizer.sep_token_id
    return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "sep_token_id": sep,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": sep}


def standin_config(tokenizer: object) -> object:
    """The tiny ``BlipConfig`` of the stand-in: vision 32 wide, 2 layers, 4 heads, patch 32 at 384 px."""
    from transformers import BlipConfig

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, encoder_hidden_size=32, initializer_range=0.5, **_token_ids(tokenizer))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=BLIP_IMAGE_SIZE, patch_size=32, initializer_range=0.5)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32)
