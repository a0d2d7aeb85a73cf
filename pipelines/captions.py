"""BLIP captions for face images, batched.

The captioner is ``Salesforce/blip-image-captioning-large`` with its default generation settings (greedy,
20 new tokens), as in the original "Uncanny Faces" build. The same loader reads the real snapshot and the
stand-in that :func:`pipelines.standins.blip.build_blip_standin` writes (the real classes at tiny size, random
weights, a locally built tokenizer): nothing is downloaded.

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


def caption_inputs(sample: FaceSample) -> list[Path]:
    """The files :func:`load_caption_input` reads: a change in one makes the sample's shard again."""
    return [sample.image_path]


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

        Weights are in the ``precision`` asked for (fp32, fp16, bf16), so the precision a report records is the
        one computed in; fp16 on the CPU is refused (``ValueError``): torch runs it slowly or not at all there.
        """
        from transformers import BlipForConditionalGeneration, BlipProcessor

        device = torch.device(device)
        if precision == "fp16" and device.type == "cpu":
            raise ValueError("BLIP in fp16 on the CPU: use fp32 or bf16")
        dtype = _HALF.get(precision, torch.float32)
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
