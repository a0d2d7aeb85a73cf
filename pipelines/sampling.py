"""Our own denoising loop over a diffusers scheduler and the diffusers model classes, with a seam for guidance.

One loop (``_denoise``) serves every conditioned denoiser: the condition is the model's keyword arguments
(``encoder_hidden_states`` for a text UNet, plus ``controlnet_cond`` for a ControlNet's residuals; ``condition``
for the attribute DDPM of :mod:`pipelines.ddpm`), with an optional null condition for classifier-free guidance
``eps = eps_null + w (eps_cond - eps_null)``. :func:`sample` is its text front: text classifier-free guidance,
optional ControlNet residuals, in latent space (with a VAE) or pixel space (``vae=None``: the UNet denoises the
image itself), one seeded noise draw per image; :func:`sample_conditioned` takes the condition tensors as they
are. With plain
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
    """The parts the loop runs: a denoiser (``UNet2DConditionModel``; for :func:`sample_conditioned` any module
    called ``unet(x, t, **condition, return_dict=False)[0]`` whose ``config.in_channels`` is the image's channel
    count), a diffusers scheduler, the CLIP text encoder and its tokenizer (None without text), and optionally an
    ``AutoencoderKL`` (None: pixel space) and a ``ControlNetModel``."""

    unet: Any
    scheduler: Any
    text_encoder: Any = None
    tokenizer: Any = None
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
    prompt_embeds: torch.Tensor | None  # the conditional text embeddings, one row per image (None: no text)
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
    device = models.unet.device
    with _grad_mode(models, guidance):
        embeds = encode_prompts(models, prompts, device)
        condition: dict[str, torch.Tensor] = {"encoder_hidden_states": embeds}
        null = None
        if guidance_scale > 1:  # diffusers' convention: no unconditional pass at a scale of 1 or less
            null = {"encoder_hidden_states": encode_prompts(models, [negative_prompt] * n, device)}
        if conditions is not None:
            control = conditions.to(device=device, dtype=models.controlnet.dtype)
            condition["controlnet_cond"] = control
            if null is not None:
                null["controlnet_cond"] = control
        return _denoise(models, condition, null, seeds, resolution, num_inference_steps, guidance_scale,
                        controlnet_conditioning_scale, guidance, generator_device, eta, embeds.dtype)


def sample_conditioned(models: SamplerModels, condition: dict[str, torch.Tensor],
                       null_condition: dict[str, torch.Tensor] | None, seeds: Sequence[int], resolution: int,
                       num_inference_steps: int, guidance_scale: float = 1.0, guidance: Sequence[GuidanceTerm] = (),
                       generator_device: str = "cpu", eta: float = 0.0) -> torch.Tensor:
    """Images from any conditioned denoiser (``models.unet(x, t, **condition)``, e.g. an attribute-conditioned
    pixel-space DDPM), one per seed: (N, 3, ``resolution``, ``resolution``) in [0, 1].

    ``condition`` and ``null_condition`` are the model's keyword arguments, batch-first tensors with one row per
    image. Classifier-free guidance is ``eps = eps_null + guidance_scale * (eps_cond - eps_null)``: a scale of 1 is
    the conditional model alone (one pass), 0 the null condition alone (one pass), anything else both passes in
    one doubled batch. ``null_condition=None``: the conditional model alone at any scale (an unconditional
    network takes ``condition={}``). Noise per image from its own seed, as :func:`sample`; latents take the
    model's dtype.
    """
    n = len(seeds)
    for name, rows in [*condition.items(), *(null_condition or {}).items()]:
        if len(rows) != n:
            raise ValueError(f"condition {name!r} has {len(rows)} rows for {n} seeds: give one per image")
    with _grad_mode(models, guidance):
        return _denoise(models, condition, null_condition, seeds, resolution, num_inference_steps, guidance_scale,
                        1.0, guidance, generator_device, eta, models.unet.dtype)


def _grad_mode(models: SamplerModels, guidance: Sequence[GuidanceTerm]) -> Any:
    """``no_grad`` when a term needs autograd (it enables it per step), else ``inference_mode``; checks that
    guidance terms meet an epsilon-predicting model."""
    if guidance and models.scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"guidance terms need an epsilon-predicting model, not "
                         f"{models.scheduler.config.prediction_type!r}")
    return torch.no_grad() if any(term.needs_grad for term in guidance) else torch.inference_mode()


def _cfg_passes(null: dict | None, guidance_scale: float) -> str:
    """Which passes a step runs: ``cond`` alone, ``null`` alone (scale 0), or ``both`` (combined)."""
    if null is None or guidance_scale == 1:
        return "cond"
    return "null" if guidance_scale == 0 else "both"


def _denoise(models: SamplerModels, condition: dict[str, torch.Tensor], null: dict[str, torch.Tensor] | None,
             seeds: Sequence[int], resolution: int, steps: int, guidance_scale: float, cond_scale: float,
             guidance: Sequence[GuidanceTerm], generator_device: str, eta: float, dtype: torch.dtype) -> torch.Tensor:
    """The one denoising loop: seeded noise, then per timestep the (CFG-combined) noise prediction, the guidance
    terms' corrections and the scheduler's step; the clean sample decoded to [0, 1]."""
    from diffusers.utils.torch_utils import randn_tensor

    if resolution % models.scale_factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downscale {models.scale_factor}")
    unet, scheduler, n = models.unet, models.scheduler, len(seeds)
    device = unet.device
    grad = any(term.needs_grad for term in guidance)
    passes = _cfg_passes(null, guidance_scale)
    batch_condition = {"cond": condition, "null": null,
                       "both": {k: torch.cat([null[k], v]) for k, v in condition.items()} if passes == "both" else None
                       }[passes]
    batch_condition = {k: v.to(device) for k, v in batch_condition.items()}
    scheduler.set_timesteps(steps, device=device)
    size = resolution // models.scale_factor
    generators = [torch.Generator(device=generator_device).manual_seed(int(s)) for s in seeds]
    latents = randn_tensor((n, unet.config.in_channels, size, size), generator=generators, device=device,
                           dtype=dtype) * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generators, eta)
    for i, t in enumerate(scheduler.timesteps):
        if grad:
            latents = latents.detach().requires_grad_(True)
        with torch.enable_grad() if grad else contextlib.nullcontext():
            noise_pred, model_input = _predict_noise(models, latents, t, batch_condition, cond_scale, passes,
                                                     guidance_scale)
            if guidance:
                noise_pred = noise_pred + _corrections(models, guidance, i, t, latents, model_input, noise_pred,
                                                       condition.get("encoder_hidden_states"))
        latents = scheduler.step(noise_pred.detach(), t, latents.detach(), **step_kwargs, return_dict=False)[0]
    return decode(models, latents)


def _predict_noise(models: SamplerModels, latents: torch.Tensor, t: torch.Tensor, condition: dict[str, torch.Tensor],
                   cond_scale: float, passes: str, guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The (CFG-combined when both passes run) noise prediction and the scaled model input of x_t."""
    both = passes == "both"
    batch = torch.cat([latents] * 2) if both else latents
    batch = models.scheduler.scale_model_input(batch, t)
    kwargs = dict(condition)
    control = kwargs.pop("controlnet_cond", None)
    if control is not None:
        down, mid = models.controlnet(batch, t, encoder_hidden_states=kwargs["encoder_hidden_states"],
                                      controlnet_cond=control, conditioning_scale=cond_scale, guess_mode=False,
                                      return_dict=False)
        kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    noise_pred = models.unet(batch, t, return_dict=False, **kwargs)[0]
    if not both:
        return noise_pred, batch
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond), batch.chunk(2)[1]


def _corrections(models: SamplerModels, guidance: Sequence[GuidanceTerm], step: int, t: torch.Tensor,
                 latents: torch.Tensor, model_input: torch.Tensor, noise_pred: torch.Tensor,
                 embeds: torch.Tensor | None) -> torch.Tensor:
    """The sum of the terms' corrections to the predicted noise at this step."""
    alpha = _alpha_prod(models.scheduler, t).to(device=latents.device, dtype=torch.float32)
    pred_x0 = (model_input - (1 - alpha).sqrt() * noise_pred) / alpha.sqrt()
    ctx = GuidanceContext(step=step, timestep=t, latents=latents, noise_pred=noise_pred, pred_x0=pred_x0,
                          alpha_prod=alpha, prompt_embeds=embeds, models=models)
    return sum(term.correction(ctx).to(noise_pred.dtype) for term in guidance)  # type: ignore[return-value]

