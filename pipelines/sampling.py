"""Our own denoising loop over a diffusers scheduler and the diffusers model classes, with a seam for guidance.

:func:`sample` runs text classifier-free guidance, optional ControlNet residuals, in latent space (with a VAE)
or pixel space (``vae=None``: the UNet denoises the image itself), one seeded noise draw per image. With plain
CFG it makes the images of ``StableDiffusionControlNetPipeline`` at the same seeds (tests/test_sampling.py):
the same noise (``randn_tensor`` with one generator per image), prompt encoding, scheduler calls and dtypes.

Guidance terms (:class:`GuidanceTerm`) see each step's latents, predicted noise and predicted clean sample
and return a correction added to the predicted noise. Autograd runs only when some term sets ``needs_grad``
(the step's latents then require grad, and the predicted noise and clean sample are functions of them);
otherwise the whole loop runs under ``torch.inference_mode``.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class SamplerModels:
    """The parts :func:`sample` runs: a ``UNet2DConditionModel``, a diffusers scheduler, the CLIP text encoder
    and its tokenizer, and optionally an ``AutoencoderKL`` (None: pixel space) and a ``ControlNetModel``."""

    unet: Any
    scheduler: Any
    text_encoder: Any
    tokenizer: Any
    vae: Any = None
    controlnet: Any = None

    @classmethod
    def from_pipeline(cls, pipe: Any) -> SamplerModels:
        """The parts of a diffusers pipeline (or any object with those attributes); a ``SamplerModels`` as is."""
        if isinstance(pipe, cls):
            return pipe
        return cls(unet=pipe.unet, scheduler=pipe.scheduler, text_encoder=pipe.text_encoder,
                   tokenizer=pipe.tokenizer, vae=getattr(pipe, "vae", None), controlnet=getattr(pipe, "controlnet", None))

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell: the VAE's downscale (``2 ** (blocks - 1)``, 8 for SD), 1 in pixel space."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1


@dataclass(frozen=True)
class GuidanceContext:
    """What a guidance term sees at one step (for one batch). With a term that ``needs_grad``, ``noise_pred``
    and ``pred_x0`` are differentiable functions of ``latents``."""

    step: int  # index into the scheduler's timesteps
    timestep: torch.Tensor
    latents: torch.Tensor  # x_t as the scheduler holds it
    noise_pred: torch.Tensor  # the predicted noise after CFG
    pred_x0: torch.Tensor  # the predicted clean sample (latents, or the image in [-1, 1] in pixel space)
    alpha_prod: torch.Tensor  # alpha-bar of this step (the signal share of x_t in variance-preserving form)
    prompt_embeds: torch.Tensor  # the conditional text embeddings, one row per image
    models: SamplerModels

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """A clean sample (latents or pixels) as images in [0, 1], differentiably."""
        return decode(self.models, x0)


class GuidanceTerm(Protocol):
    """A sampler-side guidance term (PAG/SAG, universal guidance, a classifier's gradient...)."""

    needs_grad: bool  # True: the loop runs the step with autograd on, so the term can differentiate w.r.t. latents

    def correction(self, ctx: GuidanceContext) -> torch.Tensor:
        """The correction added to ``ctx.noise_pred`` (same shape). Lowering a loss L(x0) means adding
        ``scale * sqrt(1 - alpha_prod) * dL/d(latents)``."""
        ...


def pil_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images (all one size) as a float32 (N, 3, H, W) tensor in [0, 1]."""
    arrays = [np.asarray(im.convert("RGB")).astype(np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) images in [0, 1] as RGB PIL images (rounded to the nearest 8-bit level)."""
    arrays = (images.detach().cpu().permute(0, 2, 3, 1).float().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def decode(models: SamplerModels, x0: torch.Tensor) -> torch.Tensor:
    """Clean latents through the VAE (pixels as they are) to images in [0, 1]."""
    if models.vae is not None:
        x0 = models.vae.decode(x0 / models.vae.config.scaling_factor, return_dict=False)[0]
    return (x0 / 2 + 0.5).clamp(0, 1)


def encode_prompts(models: SamplerModels, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """CLIP text embeddings of ``prompts`` (padded to the tokenizer's maximum length, truncated), in the text
    encoder's dtype."""
    tok = models.tokenizer(list(prompts), padding="max_length", max_length=models.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
    mask = tok.attention_mask.to(device) if getattr(models.text_encoder.config, "use_attention_mask", False) else None
    embeds = models.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]
    return embeds.to(dtype=models.text_encoder.dtype, device=device)


def _alpha_prod(scheduler: Any, t: torch.Tensor) -> torch.Tensor:
    """alpha-bar at the current step: from sigma for sigma-space schedulers (Euler: x_t = x0 + sigma * eps,
    initial noise sigma > 1), from ``alphas_cumprod[t]`` for the variance-preserving ones."""
    if scheduler.init_noise_sigma != 1.0:
        return 1 / (1 + scheduler.sigmas[scheduler.step_index] ** 2)
    return scheduler.alphas_cumprod[int(t)]


def _step_kwargs(scheduler: Any, generators: list[torch.Generator], eta: float) -> dict[str, Any]:
    """``eta`` and the generators for the schedulers whose ``step`` takes them (as diffusers' pipelines do)."""
    accepted = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in (("eta", eta), ("generator", generators)) if k in accepted}


def sample(models: SamplerModels, prompts: Sequence[str], seeds: Sequence[int], resolution: int,
           num_inference_steps: int, guidance_scale: float, conditions: torch.Tensor | None = None,
           controlnet_conditioning_scale: float = 1.0, negative_prompt: str = "",
           guidance: Sequence[GuidanceTerm] = (), generator_device: str = "cpu", eta: float = 0.0) -> torch.Tensor:
    """Images for a batch, one per (prompt, seed): a float (N, 3, ``resolution``, ``resolution``) tensor in [0, 1].

    CFG with ``negative_prompt`` when ``guidance_scale`` > 1; ControlNet residuals (times
    ``controlnet_conditioning_scale``) from ``conditions`` ((N, 3, H, W) in [0, 1], see :func:`pil_to_tensor`)
    when ``models.controlnet`` is set. The starting noise of each image comes from its own
    ``torch.Generator(generator_device).manual_seed(seed)`` (drawn on that device, then moved), so an image
    depends on its own seed only. Weights keep their dtypes; embeddings and latents take the text encoder's.
    Do not call it under ``torch.inference_mode`` with a term that needs grad.
    """
    n = len(prompts)
    if len(seeds) != n or (conditions is not None and len(conditions) != n):
        got = "no" if conditions is None else len(conditions)
        raise ValueError(f"{n} prompts, {len(seeds)} seeds and {got} conditions: give one of each per image")
    if (models.controlnet is None) != (conditions is None):
        raise ValueError("conditions are needed with a ControlNet, and only with one")
    if resolution % models.scale_factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downscale {models.scale_factor}")
    grad = any(term.needs_grad for term in guidance)
    if guidance and models.scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"guidance terms need an epsilon-predicting model, not "
                         f"{models.scheduler.config.prediction_type!r}")
    with torch.no_grad() if grad else torch.inference_mode():
        return _denoise(models, prompts, seeds, resolution, num_inference_steps, guidance_scale, conditions,
                        controlnet_conditioning_scale, negative_prompt, guidance, generator_device, eta, grad)


def _denoise(models: SamplerModels, prompts: Sequence[str], seeds: Sequence[int], resolution: int, steps: int,
             guidance_scale: float, conditions: torch.Tensor | None, cond_scale: float, negative_prompt: str,
             guidance: Sequence[GuidanceTerm], generator_device: str, eta: float, grad: bool) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    unet, scheduler, n = models.unet, models.scheduler, len(prompts)
    device = unet.device
    cfg = guidance_scale > 1
    embeds = encode_prompts(models, prompts, device)
    both = torch.cat([encode_prompts(models, [negative_prompt] * n, device), embeds]) if cfg else embeds
    if conditions is not None:
        conditions = conditions.to(device=device, dtype=models.controlnet.dtype)
        conditions = torch.cat([conditions] * 2) if cfg else conditions
    scheduler.set_timesteps(steps, device=device)
    size = resolution // models.scale_factor
    generators = [torch.Generator(device=generator_device).manual_seed(int(s)) for s in seeds]
    latents = randn_tensor((n, unet.config.in_channels, size, size), generator=generators, device=device,
                           dtype=embeds.dtype) * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generators, eta)
    for i, t in enumerate(scheduler.timesteps):
        if grad:
            latents = latents.detach().requires_grad_(True)
        with torch.enable_grad() if grad else contextlib.nullcontext():
            noise_pred, model_input = _predict_noise(models, latents, t, both, conditions, cond_scale,
                                                     guidance_scale if cfg else None)
            if guidance:
                noise_pred = noise_pred + _corrections(models, guidance, i, t, latents, model_input, noise_pred,
                                                       embeds)
        latents = scheduler.step(noise_pred.detach(), t, latents.detach(), **step_kwargs, return_dict=False)[0]
    return decode(models, latents)


def _predict_noise(models: SamplerModels, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                   conditions: torch.Tensor | None, cond_scale: float,
                   guidance_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (CFG-combined when ``guidance_scale`` is set) noise prediction and the scaled model input of x_t."""
    batch = torch.cat([latents] * 2) if guidance_scale is not None else latents
    batch = models.scheduler.scale_model_input(batch, t)
    residuals: dict[str, Any] = {}
    if conditions is not None:
        down, mid = models.controlnet(batch, t, encoder_hidden_states=embeds, controlnet_cond=conditions,
                                      conditioning_scale=cond_scale, guess_mode=False, return_dict=False)
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    noise_pred = models.unet(batch, t, encoder_hidden_states=embeds, return_dict=False, **residuals)[0]
    if guidance_scale is None:
        return noise_pred, batch
    uncond, text = noise_pred.chunk(2)
    return uncond + guidance_scale * (text - uncond), batch.chunk(2)[1]


def _corrections(models: SamplerModels, guidance: Sequence[GuidanceTerm], step: int, t: torch.Tensor,
                 latents: torch.Tensor, model_input: torch.Tensor, noise_pred: torch.Tensor,
                 embeds: torch.Tensor) -> torch.Tensor:
    """The sum of the terms' corrections to the predicted noise at this step."""
    alpha = _alpha_prod(models.scheduler, t).to(device=latents.device, dtype=torch.float32)
    pred_x0 = (model_input - (1 - alpha).sqrt() * noise_pred) / alpha.sqrt()
    ctx = GuidanceContext(step=step, timestep=t, latents=latents, noise_pred=noise_pred, pred_x0=pred_x0,
                          alpha_prod=alpha, prompt_embeds=embeds, models=models)
    return sum(term.correction(ctx).to(noise_pred.dtype) for term in guidance)  # type: ignore[return-value]

