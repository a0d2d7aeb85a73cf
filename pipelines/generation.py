"""Sampling images from a landmark ControlNet for evaluation: loader, batched generation, sample grid.

One loader (:func:`load_controlnet_pipeline`) reads the real snapshots (Stable Diffusion 2.1-base +
``multimodalart/uncannyfaces_25K``) and the stand-ins that :mod:`pipelines.standins.stable_diffusion` builds by
code (the real diffusers/transformers classes at tiny size, random weights): nothing is downloaded. Images come
from our own denoising loop over the pipeline's parts (:mod:`pipelines.sampling`), not the pipeline's ``__call__``.
Every image depends only on its own seed (:func:`seed_for` of its condition id), so results do not change with
the batch size.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipelines.sampling import GuidanceTerm, SamplerModels, pil_to_tensor, sample, tensor_to_pil

#: params name -> diffusers scheduler class name (the released demo used UniPC)
SCHEDULERS: dict[str, str] = {
    "unipc": "UniPCMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}

# --- loading --------------------------------------------------------------------------------------------


def make_scheduler(name: str, config: Any) -> Any:
    """The scheduler ``name`` (unipc | ddim | euler | dpm) built from another scheduler's ``config``."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def upcast_vae_decode(vae: torch.nn.Module) -> torch.nn.Module:
    """Keep ``vae`` in fp32 and cast the latents it decodes to fp32 (fp16 VAE decodes can give black images).

    The SD ControlNet pipeline does not honour ``vae.config.force_upcast`` itself, so the loader does it.
    """
    vae.to(torch.float32)
    decode = vae.decode

    def decode_fp32(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return decode(z.to(torch.float32), *args, **kwargs)

    vae.decode = decode_fp32  # type: ignore[method-assign]
    return vae


def load_controlnet_pipeline(sd_base_dir: str | Path, controlnet_dir: str | Path, scheduler: str = "unipc",
                             device: torch.device | str = "cpu", precision: str = "fp32") -> Any:
    """Load ``StableDiffusionControlNetPipeline`` from local folders (real snapshots and stand-ins alike).

    Weights are fp16/bf16 on CUDA when ``precision`` asks for it, fp32 elsewhere; in half precision the VAE
    stays fp32 when its config says ``force_upcast`` (see :func:`upcast_vae_decode`). The scheduler is
    replaced by ``scheduler`` built from the base model's scheduler config; no safety checker; progress bar
    off; on CUDA the UNet and ControlNet use channels-last memory.
    """
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    device = torch.device(device)
    dtype = _HALF.get(precision, torch.float32) if device.type == "cuda" else torch.float32
    controlnet = ControlNetModel.from_pretrained(str(controlnet_dir), dtype=dtype)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(sd_base_dir), controlnet=controlnet, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, dtype=dtype)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.to(device)
    if dtype != torch.float32 and pipe.vae.config.get("force_upcast", False):
        upcast_vae_decode(pipe.vae)
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.controlnet.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- sampling ---------------------------------------------------------------------------------------------


def seed_for(id: str, base_seed: int) -> int:
    """The fixed seed of the condition ``id``: the first 4 bytes of SHA-256 of ``"{base_seed}:{id}"``,
    big-endian, masked to 31 bits. Stable across runs, machines and Python versions (unlike ``hash``)."""
    digest = hashlib.sha256(f"{base_seed}:{id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class GenerationJob:
    """One image to make: which condition (``row`` of the id-sorted split, ``id``), prompt and seed, and the
    path of the image under the output folder."""

    file_name: str
    id: str
    row: int
    prompt: str
    seed: int
    prompt_index: int | None = None  # off-distribution jobs: the prompt's position in the fixed list


#: Files a generated set lists its images in (under ``data/generated/<model>/``), one JSON object a line.
METADATA = "metadata.jsonl"  # the conditions with their own captions
OFF_DISTRIBUTION_METADATA = "off_distribution.jsonl"  # the fixed off-distribution prompts


def write_jobs(path: str | Path, jobs: Sequence[GenerationJob]) -> None:
    """One line per job: ``file_name``, ``id``, ``prompt``, ``seed`` (and ``prompt_index`` when set)."""
    with open(path, "w") as fh:
        for j in jobs:
            row = {"file_name": j.file_name, "id": j.id, "prompt": j.prompt, "seed": j.seed}
            if j.prompt_index is not None:
                row["prompt_index"] = j.prompt_index
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def condition_jobs(ids: Sequence[str], captions: Sequence[str], base_seed: int) -> list[GenerationJob]:
    """One job per condition with its own caption: ``images/{id}.png``, seed :func:`seed_for` of the id."""
    if len(ids) != len(captions):
        raise ValueError(f"{len(ids)} ids but {len(captions)} captions")
    return [GenerationJob(f"images/{i}.png", i, r, c, seed_for(i, base_seed))
            for r, (i, c) in enumerate(zip(ids, captions, strict=True))]


def off_distribution_jobs(ids: Sequence[str], prompts: Sequence[str], base_seed: int) -> list[GenerationJob]:
    """Every fixed off-distribution prompt on every condition of ``ids`` (rows 0..k-1):
    ``off_distribution/{j:02d}_{id}.png``. The seed is the condition's own, so each image differs from the
    condition's in-distribution image by its prompt alone."""
    return [GenerationJob(f"off_distribution/{j:02d}_{i}.png", i, r, p, seed_for(i, base_seed), j)
            for j, p in enumerate(prompts) for r, i in enumerate(ids)]


def prepare_condition(image: Image.Image, resolution: int) -> Image.Image:
    """The condition as RGB at ``resolution`` x ``resolution`` (Lanczos, as diffusers' image processor)."""
    image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.LANCZOS)
    return image


def generate_images(pipe: Any, conditions: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int],
                    resolution: int, num_inference_steps: int, guidance_scale: float,
                    controlnet_conditioning_scale: float = 1.0, negative_prompt: str = "",
                    generator_device: str = "cpu", guidance: Sequence[GuidanceTerm] = ()) -> list[Image.Image]:
    """A batch through our own loop (:func:`pipelines.sampling.sample`): an image per (condition, prompt, seed),
    ``resolution`` px, from the parts of ``pipe`` (a ``StableDiffusionControlNetPipeline`` or ``SamplerModels``).

    Each image has its own ``torch.Generator(generator_device).manual_seed(seed)``, so it depends on its
    own seed only, not on the batch it is in. The default CPU generators give the same starting noise on
    every device (drawn on CPU and moved). ``guidance``: optional sampler-side guidance terms.
    """
    n = len(conditions)
    if not (len(prompts) == len(seeds) == n):
        raise ValueError(f"{n} conditions, {len(prompts)} prompts and {len(seeds)} seeds: give one of each per image")
    if n == 0:
        return []
    images = sample(SamplerModels.from_pipeline(pipe), prompts, seeds, resolution, num_inference_steps,
                    guidance_scale, pil_to_tensor([prepare_condition(c, resolution) for c in conditions]),
                    controlnet_conditioning_scale, negative_prompt, guidance, generator_device)
    return tensor_to_pil(images)


def sample_grid(conditions: Sequence[Image.Image], generated: Sequence[Image.Image], n: int, cell: int,
                labels: Sequence[str] | None = None) -> Image.Image:
    """``n`` rows of (condition | generated), each cell ``cell`` px: an image ``2*cell`` wide, ``n*cell`` high.

    Fewer pairs than ``n`` give fewer rows. ``labels`` (one per row, e.g. the prompt) are written in white
    at the bottom of the condition cell, wrapped to its width.
    """
    rows = min(n, len(conditions), len(generated))
    if rows < 1:
        raise ValueError("sample_grid needs at least one (condition, generated) pair")
    grid = Image.new("RGB", (2 * cell, rows * cell))
    for r in range(rows):
        for c, image in enumerate((conditions[r], generated[r])):
            grid.paste(image.convert("RGB").resize((cell, cell), Image.LANCZOS), (c * cell, r * cell))
    if labels is not None:
        _write_labels(grid, list(labels)[:rows], cell)
    return grid


def _write_labels(grid: Image.Image, labels: list[str], cell: int) -> None:
    import textwrap

    from PIL import ImageDraw, ImageFont

    size = max(8, cell // 16)
    font = ImageFont.load_default(size)
    draw = ImageDraw.Draw(grid)
    width = max(8, int(cell / (0.6 * size)))  # characters per line of a cell
    for r, label in enumerate(labels):
        text = "\n".join(textwrap.wrap(label, width)[:3])
        box = draw.multiline_textbbox((0, 0), text, font=font)
        draw.multiline_text((2, (r + 1) * cell - (box[3] - box[1]) - 4), text, fill=(255, 255, 255), font=font)


# --- inputs ------------------------------------------------------------------------------------------------


def load_conditions(dataset_dir: str | Path, split: str = "validation", limit: int | None = None,
                    cache_dir: str | Path | None = None) -> Any:
    """The ``split`` of the Hub-layout dataset at ``dataset_dir`` as a ``datasets.Dataset`` of ``id``,
    ``conditioning_image``, ``text``, sorted by id, the first ``limit`` rows (all when None).

    Images decode lazily (index it per batch), so a thousand 512 px conditions do not sit in memory.
    """
    from pipelines.hfdata import load_split_sorted

    return load_split_sorted(dataset_dir, split, ["id", "conditioning_image", "text"], limit, cache_dir)
