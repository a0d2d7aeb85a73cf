"""The landmark ControlNet as a task of the training loop (:mod:`pipelines.training.loop`).

The recipe is diffusers' ``train_controlnet.py`` (SD 2.1-base, epsilon target, MSE, AdamW, constant lr);
the loop owns order, noise, accumulation, precision, checkpoints, resume, logs and the non-finite guards.
This module holds only the ControlNet's part (:class:`ControlNetTask`):

* **Data contract** (:func:`make_transform`): the image column -> resize + centre crop -> [-1, 1]; the
  conditioning image column -> the same geometry -> [0, 1]; the caption column (a string, or a list of them:
  one drawn per sample with the micro-step's generator, the first in validation) -> CLIP token ids (padded
  to the tokenizer's ``model_max_length``). The columns are settings checked against the dataset
  (diffusers' ``--image_column`` convention). A share ``proportion_empty_prompts`` of prompts becomes "".
* **Precision**: the frozen VAE, UNet and text encoder run in the mixed-precision dtype; the ControlNet is
  autocast, its weights stay fp32.
* **Models**: ``save_pretrained`` of the ControlNet (fp32, safetensors; loadable by
  ``ControlNetModel.from_pretrained``) and a ``README.md`` model card, both in the output folder; every
  checkpoint holds the ControlNet the same way in ``checkpoint-<step>/controlnet/``.
* **Validation**: (condition | generated) grids for the first validation conditions at fixed seeds.

This module never reads params.yaml: :class:`TrainSettings` is filled by ``stages/train_controlnet.py``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.generation import generate_images, make_scheduler, sample_grid, seed_for
from pipelines.hfdata import load_split_sorted
from pipelines.training.data import (
    TransformedRows,
    caption_options,
    dataset_digest,
    first_caption,
    load_rows,
    pick_captions,
)
from pipelines.training.loop import (
    DTYPES,
    LoopSettings,
    run_training,
)

GRID_CELL_MAX = 256
#: diffusers' default ControlNet condition embedding (SD: VAE downscale 8 = three stride-2 convolutions)
DEFAULT_CONDITIONING_CHANNELS = (16, 32, 96, 256)
DIVERGED_HINT = "lower train_controlnet.learning_rate, or use train_controlnet.mixed_precision fp32"
#: the settings naming the dataset's columns (diffusers' train_controlnet.py arguments)
COLUMN_ARGS = ("image_column", "conditioning_image_column", "caption_column")


@dataclass(frozen=True)
class TrainSettings(LoopSettings):
    """Every knob of a ControlNet training run (the ``train_controlnet`` params section, resolved): the
    loop's (:class:`~pipelines.training.loop.LoopSettings`) and the ControlNet's."""

    resolution: int = 512
    gradient_checkpointing: bool = False
    num_validation_images: int = 4
    validation_extra_prompts: tuple[str, ...] = ()  # drawn on the first validation condition, one grid row each
    validation_inference_steps: int = 20
    validation_guidance_scale: float = 7.5
    validation_scheduler: str = "unipc"
    proportion_empty_prompts: float = 0.0
    image_column: str = "image"
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"  # strings, or lists of strings (one drawn per sample)


#: ControlNet settings that change what a step computes (with the loop's: the checkpoint fingerprint)
_RECIPE_KEYS = ("resolution", "proportion_empty_prompts", *COLUMN_ARGS)


# --- data -------------------------------------------------------------------------------------------------


def image_transform(resolution: int) -> Callable[[Image.Image], torch.Tensor]:
    """``image`` -> RGB, bilinear resize of the short side to ``resolution``, centre crop, [-1, 1] CHW."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])


def condition_transform(resolution: int) -> Callable[[Image.Image], torch.Tensor]:
    """``conditioning_image`` -> the same geometry as :func:`image_transform`, values in [0, 1]."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution), transforms.ToTensor()])


def tokenize(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """CLIP token ids, padded/truncated to the tokenizer's ``model_max_length``: (N, L) long."""
    return tokenizer(list(texts), max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


class RowTransform:
    """The per-row transform of the diffusers ControlNet contract: a dataset row (``image_column``,
    ``conditioning_image_column``, ``caption_column``) -> ``pixel_values``, ``conditioning_pixel_values``,
    ``input_ids``: ``(L,)`` for a string caption, ``(K, L)`` for a list of ``K`` (one is drawn per micro-step,
    :func:`~pipelines.training.data.pick_captions`). A class, not a closure, so that DataLoader workers started
    by ``spawn`` or ``forkserver`` (a spawned benchmark process, Python 3.14's default) can receive it."""

    def __init__(self, tokenizer: Any, resolution: int, image_column: str = "image",
                 conditioning_image_column: str = "conditioning_image", caption_column: str = "text"):
        self.tokenizer, self.columns = tokenizer, (image_column, conditioning_image_column, caption_column)
        self.image, self.condition = image_transform(resolution), condition_transform(resolution)

    def __call__(self, row: dict) -> dict:
        image_column, conditioning_image_column, caption_column = self.columns
        caption = row[caption_column]
        ids = tokenize(self.tokenizer, caption_options(caption))
        return {"pixel_values": self.image(row[image_column].convert("RGB")),
                "conditioning_pixel_values": self.condition(row[conditioning_image_column].convert("RGB")),
                "input_ids": ids[0] if isinstance(caption, str) else ids}


def make_transform(tokenizer: Any, resolution: int, image_column: str = "image",
                   conditioning_image_column: str = "conditioning_image",
                   caption_column: str = "text") -> Callable[[dict], dict]:
    """The :class:`RowTransform` of these columns at ``resolution``."""
    return RowTransform(tokenizer, resolution, image_column, conditioning_image_column, caption_column)


# --- models -----------------------------------------------------------------------------------------------


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The condition embedding channels that bring a full-size condition to the latent size: diffusers'
    ``(16, 32, 96, 256)`` (downscale 8: SD's VAE and the stand-in's) cut to ``log2(vae_scale_factor) + 1``
    blocks for a VAE that downscales less (2: ``(16, 32)``)."""
    k = int(round(math.log2(vae_scale_factor)))
    if 2 ** k != vae_scale_factor or not 0 < k < len(DEFAULT_CONDITIONING_CHANNELS):
        raise ValueError(f"VAE downscale {vae_scale_factor} is not 2, 4 or 8")
    return DEFAULT_CONDITIONING_CHANNELS[:k + 1]


@dataclass
class Components:
    """The frozen Stable Diffusion parts, the trained ControlNet and the training noise scheduler."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any
    controlnet: Any
    noise_scheduler: Any

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_components(pretrained_dir: str | Path, controlnet_dir: str | Path | None = None, seed: int = 0) -> Components:
    """Load SD's parts from a local folder (a real snapshot or the stand-in) and the ControlNet to train:
    from ``controlnet_dir`` when given, else ``ControlNetModel.from_unet(unet)`` (condition embedding drawn
    under ``torch.manual_seed(seed)``; zero convolutions zero). Training noise: DDPM with the base's
    scheduler config (its ``prediction_type`` decides the target)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(pretrained_dir)
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root} holds no Stable Diffusion model (no model_index.json)")
    vae = AutoencoderKL.from_pretrained(root / "vae")
    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
    if controlnet_dir is not None:
        controlnet = ControlNetModel.from_pretrained(str(controlnet_dir))
    else:
        torch.manual_seed(seed)
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(scale))
    return Components(vae, text_encoder, tokenizer, unet, controlnet, noise_scheduler)


def training_loss(c: Components, controlnet: Any, batch: dict, generator: torch.Generator,
                  weight_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ControlNet loss of one batch: encode, add noise at random timesteps, predict with the frozen
    UNet plus the ControlNet's residuals, MSE against the scheduler's target (noise for ``epsilon``, the
    velocity for ``v_prediction``). All randomness comes from ``generator`` (CPU)."""
    device = c.unet.device
    pixel_values = batch["pixel_values"].to(device, weight_dtype)
    with torch.no_grad():
        latents = c.vae.encode(pixel_values).latent_dist.sample(generator=generator)
        latents = latents * c.vae.config.scaling_factor
        enc = c.text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device, latents.dtype)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, c.noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator).to(device)
    noisy = c.noise_scheduler.add_noise(latents, noise, timesteps)
    cond = batch["conditioning_pixel_values"].to(device, weight_dtype)
    down, mid = controlnet(noisy, timesteps, encoder_hidden_states=enc, controlnet_cond=cond, return_dict=False)
    pred = c.unet(noisy, timesteps, encoder_hidden_states=enc,
                  down_block_additional_residuals=[s.to(weight_dtype) for s in down],
                  mid_block_additional_residual=mid.to(weight_dtype), return_dict=False)[0]
    kind = c.noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = c.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


# --- validation and card ----------------------------------------------------------------------------------


def validation_pipeline(c: Components, controlnet: Any, scheduler: str) -> Any:
    """``StableDiffusionControlNetPipeline`` over the in-memory parts and the ControlNet being trained."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, controlnet=controlnet,
        scheduler=make_scheduler(scheduler, c.noise_scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def validation_grid(c: Components, controlnet: Any, conditions: Sequence[Image.Image], prompts: Sequence[str],
                    seeds: Sequence[int], labels: Sequence[str] | None, s: TrainSettings,
                    weight_dtype: torch.dtype) -> Image.Image:
    """(condition | generated) rows for the fixed validation conditions, prompts and seeds; ``labels`` (one
    per row, or None) are written on the rows (see :func:`~pipelines.generation.sample_grid`)."""
    if weight_dtype != torch.float32:
        # a half copy of the ControlNet, so the whole pipeline runs in one dtype (CPU autocast leaves
        # group_norm mixed, and accelerate's fp32 output wrapper would hand fp32 residuals to the half UNet)
        half = type(controlnet).from_config(controlnet.config)
        half.load_state_dict(controlnet.state_dict())
        controlnet = half.to(c.unet.device, weight_dtype)
    pipe = validation_pipeline(c, controlnet, s.validation_scheduler)
    was_training = controlnet.training
    controlnet.eval()
    images = generate_images(pipe, conditions, prompts, seeds, s.resolution, s.validation_inference_steps,
                             s.validation_guidance_scale)
    controlnet.train(was_training)
    return sample_grid(conditions, images, len(images), min(s.resolution, GRID_CELL_MAX), labels)


def write_model_card(out_dir: str | Path, *, base_model: str, dataset: str, settings: TrainSettings, steps: int,
                     metrics: dict, standin: bool, note: str = "") -> Path:
    """``README.md`` for the saved ControlNet: front matter (base model, data, tags) + recipe + metrics."""
    out = Path(out_dir) / "README.md"
    front = {"license": "openrail++", "base_model": base_model, "datasets": [dataset], "library_name": "diffusers",
             "tags": ["controlnet", "stable-diffusion", "face-landmarks", "facecontrol"],
             "inference": False}
    columns = ", ".join(f"`{getattr(settings, k)}`" for k in COLUMN_ARGS)
    recipe = "\n".join(f"| `{k}` | `{v}` |" for k, v in asdict(settings).items())
    mets = "\n".join(f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |"
                     for k, v in metrics.items())
    warning = ("\n> **STAND-IN RUN.** Trained from random-weight stand-in models on the embedded sample: "
               "this model is meaningless; it only proves the pipeline runs.\n" if standin else "")
    import yaml

    text = f"""---
{yaml.safe_dump(front, sort_keys=True).strip()}
---

# Landmark ControlNet (facecontrol)
{warning}
A ControlNet for `{base_model}` conditioned on 68-point face landmark drawings, trained by the facecontrol
pipeline (`stages/train_controlnet.py`, `pipelines/training/controlnet.py` on the loop of
`pipelines/training/loop.py`) on `{dataset}` (split `train`; columns {columns}). {note}

Load it with diffusers:

```python
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
controlnet = ControlNetModel.from_pretrained("path/to/controlnet_landmarks")
pipe = StableDiffusionControlNetPipeline.from_pretrained("{base_model}", controlnet=controlnet)
```

## Training

Optimizer steps: **{steps}**. Target: the base scheduler's prediction type, MSE loss; ControlNet weights
in fp32, frozen parts in the mixed-precision dtype; AdamW.

| setting | value |
|---|---|
{recipe}

## Metrics (final)

| metric | value |
|---|---|
{mets}
"""
    out.write_text(text)
    return out


# --- the task ---------------------------------------------------------------------------------------------


class ControlNetTask:
    """The ControlNet as a :class:`~pipelines.training.loop.TrainingTask`: SD's frozen parts, the training
    rows of ``dataset_dir`` (columns from the settings), the loss, validation grids, ``save_pretrained``
    and the model card (``card``: ``base_model``, ``dataset``, ``standin``, ``note``)."""

    name = "train_controlnet"
    model_name = "controlnet"
    diverged_hint = DIVERGED_HINT

    def __init__(self, settings: TrainSettings, pretrained_dir: str | Path, dataset_dir: str | Path, *,
                 controlnet_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                 card: dict | None = None):
        s = self.s = settings
        self.dataset_dir, self.pretrained_dir, self.card = Path(dataset_dir), Path(pretrained_dir), card or {}
        c = self.c = load_components(pretrained_dir, controlnet_dir, s.seed)
        multiple = c.vae_scale_factor * 2 ** (len(c.unet.config.block_out_channels) - 1)
        if s.resolution % multiple:
            raise ValueError(f"resolution {s.resolution} must be a multiple of {multiple} for this VAE and UNet")
        if s.gradient_checkpointing:
            c.controlnet.enable_gradient_checkpointing()
        self.model, self.frozen = c.controlnet, (c.vae, c.unet, c.text_encoder)
        columns = {k: getattr(s, k) for k in COLUMN_ARGS}
        train = load_rows(dataset_dir, "train", columns, cache_dir)
        if len(train) == 0:
            raise FileNotFoundError(f"{dataset_dir} has no training rows")
        self.rows = TransformedRows(train, make_transform(c.tokenizer, s.resolution, **columns))
        self.empty_ids = tokenize(c.tokenizer, [""])[0]
        self.validation_rows = self._validation_rows(cache_dir)

    def _validation_rows(self, cache_dir: str | Path | None) -> tuple | None:
        """(conditions, prompts, seeds, labels) of the grid: the first validation rows by id, then the extra
        prompts on the first condition (labelled rows); None without validation."""
        s = self.s
        if s.num_validation_images <= 0:
            return None
        vds = load_split_sorted(self.dataset_dir, "validation", ["id", s.conditioning_image_column, s.caption_column],
                                s.num_validation_images, cache_dir)
        if not len(vds):
            return None
        conditions = list(vds[s.conditioning_image_column])
        prompts = [first_caption(t) for t in vds[s.caption_column]]
        seeds = [seed_for(i, s.seed) for i in vds["id"]]
        extra = list(s.validation_extra_prompts)  # e.g. "a cat": an overfitting model draws a face anyway
        return (conditions + conditions[:1] * len(extra), prompts + extra, seeds + seeds[:1] * len(extra),
                [""] * len(prompts) + extra if extra else None)

    def recipe(self) -> dict:
        """The ControlNet settings in the checkpoint fingerprint."""
        return {k: getattr(self.s, k) for k in _RECIPE_KEYS}

    def data_identity(self) -> str:
        """:func:`~pipelines.training.data.dataset_digest` of the dataset folder."""
        return dataset_digest(self.dataset_dir)

    def loss(self, model: Any, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """One caption per sample, a share of them emptied, then :func:`training_loss` (MSE, no parts)."""
        ids = pick_captions(batch["input_ids"], generator)
        if self.s.proportion_empty_prompts > 0:
            drop = torch.rand(ids.shape[0], generator=generator) < self.s.proportion_empty_prompts
            ids[drop] = self.empty_ids
        return training_loss(self.c, model, {**batch, "input_ids": ids}, generator, DTYPES[self.s.mixed_precision]), {}

    def validate(self, step: int) -> Image.Image | None:
        """The validation grid of the ControlNet as it is now."""
        if self.validation_rows is None:
            return None
        return validation_grid(self.c, self.model, *self.validation_rows, self.s, DTYPES[self.s.mixed_precision])

    def save(self, out_dir: Path) -> None:
        """``save_pretrained`` of the ControlNet (fp32, safetensors)."""
        self.model.save_pretrained(out_dir, safe_serialization=True)

    def write_card(self, out_dir: Path, steps: int, metrics: dict) -> None:
        """The model card (:func:`write_model_card`)."""
        info = self.card
        write_model_card(out_dir, base_model=info.get("base_model", str(self.pretrained_dir)),
                         dataset=info.get("dataset", str(self.dataset_dir)), settings=self.s, steps=steps,
                         metrics=metrics, standin=bool(info.get("standin", False)), note=info.get("note", ""))


def train_controlnet(settings: TrainSettings, pretrained_dir: str | Path, dataset_dir: str | Path,
                     output_dir: str | Path, checkpoints_dir: str | Path, log_dir: str | Path, *,
                     controlnet_dir: str | Path | None = None, cpu: bool = False,
                     cache_dir: str | Path | None = None, stop_after: int | None = None,
                     card: dict | None = None, identity: dict | None = None,
                     on_step: Callable[[int, Any], None] | None = None) -> dict:
    """Train (or resume) a ControlNet (:class:`ControlNetTask` in :func:`~pipelines.training.loop.run_training`,
    whose docstring tells resume, ``stop_after``, ``identity``, ``cpu`` and ``on_step``); returns its summary.

    The ControlNet starts from ``controlnet_dir`` when given, else from the base UNet; ``card`` fills the model
    card; a column the settings name that the dataset lacks raises
    :class:`~pipelines.training.data.MissingColumn` before anything is trained.
    """
    task = ControlNetTask(settings, pretrained_dir, dataset_dir, controlnet_dir=controlnet_dir, cache_dir=cache_dir,
                          card=card)
    return run_training(task, settings, output_dir, checkpoints_dir, log_dir, cpu=cpu, stop_after=stop_after,
                        identity=identity, on_step=on_step)
