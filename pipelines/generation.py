"""Sampling images from a landmark ControlNet for evaluation: loader, batched generation, sample grid.

One loader (:func:`load_controlnet_pipeline`) reads the real snapshots (Stable Diffusion 2.1-base +
``multimodalart/uncannyfaces_25K``) and the stand-ins built here by code (the real diffusers/transformers
classes at tiny size, random weights): nothing is downloaded. Every image depends only on its own seed
(:func:`seed_for` of its condition id), so results do not change with the batch size.
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

#: params name -> diffusers scheduler class name (the released demo used UniPC)
SCHEDULERS: dict[str, str] = {
    "unipc": "UniPCMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}

# --- stand-ins ----------------------------------------------------------------------------------------

#: The tiny UNet shared by the SD stand-in and the ControlNet stand-in, SD 2.1-base's layout at tiny width:
#: linear projections, cross-attention in all down blocks but the last and all up blocks but the first,
#: the cross-attention width = the text encoder's hidden size, channels divisible by the heads
#: (``attention_head_dim`` is the number of heads, as in SD 2.x's config). Two blocks instead of four, so
#: the 8x8 latent of a 64 px image (``sample_size`` = 64 / 8) still halves once: 8 -> 4.
TINY_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
)
#: Tiny VAE: four blocks like SD's, so the same downscale of 8 (``2 ** (4 - 1)``), 4 latent channels and
#: SD's scaling factor; ``sample_size`` is the pixel resolution it works at (64 px -> 8x8 latents).
TINY_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=0.18215,
)
#: Tiny CLIP text encoder over the 514-token offline tokenizer (512 byte tokens + BOS 512 + EOS 513).
TINY_TEXT: dict[str, Any] = dict(
    vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=512, eos_token_id=513,
    pad_token_id=513,
)
#: The scheduler config of stabilityai/stable-diffusion-2-1-base (PNDM, scaled-linear betas).
SD_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
#: Condition embedding of the stand-in ControlNet: the real one (diffusers' default, three stride-2
#: convolutions), so a 64 px condition meets the 8x8 latent as a 512 px one meets SD's 64x64.
CONDITIONING_CHANNELS = (16, 32, 96, 256)


def _tiny_unet(seed: int) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET)


def build_sd_standin(dest: str | Path, seed: int = 0) -> Path:
    """Save a TINY random-weight Stable Diffusion pipeline (the SD 2.1-base layout) into ``dest``.

    Folders ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` (the offline CLIP tokenizer of
    :func:`pipelines.standins.build_clip_tokenizer`), ``scheduler/`` (SD 2.1-base's PNDM config) and
    ``model_index.json``, written by ``save_pretrained``; no safety checker or feature extractor. Weights
    are drawn under ``torch.manual_seed(seed)``: the same seed gives the same weights. It works at 64 px
    (any multiple of 16): the VAE downscales by 8 like SD's, so stock SD/ControlNet code runs on it.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pipelines.standins import build_clip_tokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    unet = _tiny_unet(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    tokenizer = CLIPTokenizer.from_pretrained(str(build_clip_tokenizer(dest / "tokenizer")))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def build_controlnet_standin(dest: str | Path, seed: int = 0) -> Path:
    """Save a TINY random-weight ``ControlNetModel`` into ``dest``: ``from_unet`` of the stand-in SD UNet
    (same config and seed as :func:`build_sd_standin`), with ``from_unet``'s default (real) conditioning
    embedding ``(16, 32, 96, 256)``, so a 64 px RGB condition meets the 8x8 latent. Its zero convolutions
    are re-drawn at random (seeded) so that the condition does change the output, as a trained
    ControlNet's does.
    """
    from diffusers import ControlNetModel

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    controlnet = ControlNetModel.from_unet(_tiny_unet(seed), conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    gen = torch.Generator().manual_seed(seed + 3)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.05)
    controlnet.save_pretrained(dest, safe_serialization=True)
    return dest


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


@torch.inference_mode()
def generate_images(pipe: Any, conditions: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int],
                    resolution: int, num_inference_steps: int, guidance_scale: float,
                    controlnet_conditioning_scale: float = 1.0, negative_prompt: str = "",
                    generator_device: str = "cpu") -> list[Image.Image]:
    """One pipeline call for the batch: an image per (condition, prompt, seed), ``resolution`` px.

    Each image has its own ``torch.Generator(generator_device).manual_seed(seed)``, so it depends on its
    own seed only, not on the batch it is in. The default CPU generators give the same starting noise on
    every device (diffusers draws on CPU and moves it).
    """
    n = len(conditions)
    if not (len(prompts) == len(seeds) == n):
        raise ValueError(f"{n} conditions, {len(prompts)} prompts and {len(seeds)} seeds: give one of each per image")
    if n == 0:
        return []
    generators = [torch.Generator(device=generator_device).manual_seed(int(s)) for s in seeds]
    out = pipe(prompt=list(prompts), image=[prepare_condition(c, resolution) for c in conditions],
               height=resolution, width=resolution, num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, controlnet_conditioning_scale=controlnet_conditioning_scale,
               negative_prompt=[negative_prompt] * n if guidance_scale > 1 else None,
               generator=generators, output_type="pil")
    return list(out.images)


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
