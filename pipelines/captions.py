"""BLIP captions for face images, batched.

The captioner is ``Salesforce/blip-image-captioning-large`` with its default generation settings (greedy,
20 new tokens), as in the original "Uncanny Faces" build. The same loader reads the real snapshot and the
stand-in that :func:`build_blip_standin` writes (the real classes at tiny size, random weights, a locally
built tokenizer): nothing is downloaded.

Work is split so that a ``DataLoader`` worker runs :meth:`BlipCaptioner.preprocess` (image processor only) and
the main process runs :meth:`BlipCaptioner.caption` (one ``generate`` call per batch).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipelines.shards import Failure, to_tensor_batch
from pipelines.sources.facesynthetics import FaceSample, SampleError, read_image

# The real model's image processor: 384 px, bicubic, OpenAI CLIP mean/std.
BLIP_IMAGE_SIZE = 384
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BLIP_MAX_NEW_TOKENS = 20  # transformers' default generation length (greedy), the one the real model runs with

CAPTION_SCHEMA = pa.schema([pa.field("text", pa.string())])

_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def pixel_values(image_processor: object, image_rgb: np.ndarray) -> np.ndarray:
    """``image_processor`` applied to one HxWx3 uint8 RGB image: (3, H, W) float32."""
    if not image_rgb.flags.writeable:  # decoded images are often read-only views
        image_rgb = image_rgb.copy()
    out = image_processor(images=image_rgb, return_tensors="np")["pixel_values"]
    return np.ascontiguousarray(out[0], dtype=np.float32)


def load_caption_input(sample: FaceSample, image_size: int, image_processor: object | None) -> dict | Failure:
    """Read one sample's image and preprocess it (runs in DataLoader workers; bad images become Failures).

    ``image_processor`` None (method ``none``): the image is only checked, and the result is empty.
    """
    try:
        image = read_image(sample.image_path, size=image_size)
    except SampleError as exc:
        return Failure(exc.reason, exc.detail)
    return {} if image_processor is None else {"pixel_values": pixel_values(image_processor, image)}


def caption_batch_fn(captioner: BlipCaptioner | None) -> Callable[[list[dict]], list[dict]]:
    """The batch function for :class:`~pipelines.shards.ShardedMap`: one ``generate`` per batch (or empty texts)."""

    def infer(batch: list[dict]) -> list[dict]:
        if captioner is None:
            return [{"text": ""} for _ in batch]
        return [{"text": t} for t in captioner.caption(to_tensor_batch([b["pixel_values"] for b in batch]))]

    return infer


@dataclass
class BlipCaptioner:
    """A BLIP captioning model with its processor, on one device and precision."""

    model: torch.nn.Module
    processor: object  # transformers.BlipProcessor
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, model_dir: str | Path, device: torch.device | str = "cpu", precision: str = "fp32") -> BlipCaptioner:
        """Load a saved ``BlipForConditionalGeneration`` + ``BlipProcessor`` from ``model_dir`` (no download).

        Weights are fp16/bf16 on CUDA when ``precision`` asks for it, fp32 otherwise.
        """
        from transformers import BlipForConditionalGeneration, BlipProcessor

        device = torch.device(device)
        dtype = _HALF.get(precision, torch.float32) if device.type == "cuda" else torch.float32
        processor = BlipProcessor.from_pretrained(str(model_dir))
        model = BlipForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype)
        model.eval().to(device)
        return cls(model=model, processor=processor, device=device, dtype=dtype)

    def preprocess(self, image_rgb: np.ndarray) -> np.ndarray:
        """One HxWx3 uint8 RGB image to BLIP ``pixel_values`` (3, 384, 384) float32 (image processor only)."""
        return pixel_values(self.processor.image_processor, image_rgb)

    @torch.inference_mode()
    def caption(self, pixel_values: torch.Tensor) -> list[str]:
        """Captions for a batch (B, 3, H, W): one ``generate`` call with the model's default settings."""
        pixel_values = pixel_values.to(self.device, dtype=self.dtype, non_blocking=True)
        ids = self.model.generate(pixel_values=pixel_values)
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]


@torch.inference_mode()
def original_caption(model: torch.nn.Module, processor: object, image_rgb: np.ndarray, device: torch.device | str) -> str:
    """The original build's way, the benchmark baseline: one image through processor + ``generate`` (batch 1)."""
    inputs = processor(images=Image.fromarray(image_rgb), return_tensors="pt").to(device)
    dtype = next(model.parameters()).dtype
    out = model.generate(pixel_values=inputs["pixel_values"].to(dtype))
    return processor.decode(out[0], skip_special_tokens=True).strip()


# --- stand-in ---------------------------------------------------------------------------------------

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


def blip_large_standin_config() -> object:
    """The geometry of ``Salesforce/blip-image-captioning-large`` (ViT-L/16 at 384 px, BERT-base text decoder,
    446 M parameters) for random-weight throughput measurements; token ids as in the real config."""
    from transformers import BlipConfig

    text = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=512, encoder_hidden_size=1024,
                pad_token_id=0, sep_token_id=102, bos_token_id=30522, eos_token_id=2)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=BLIP_IMAGE_SIZE, patch_size=16, layer_norm_eps=1e-5)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=512, image_text_hidden_size=256)
