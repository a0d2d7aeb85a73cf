"""The attribute-conditioned pixel-space DDPM (the seed's CelebA model, with real classifier-free guidance).

**Network** (:class:`AttributeUNet`): diffusers' ``UNet2DModel`` (the seed's: 64 px, channels (32, 32, 32, 64),
attention in the two lower blocks) with the condition fed one of three ways (``conditioning``):

* ``input_channels`` (the seed's): ``Linear(A + 1, condition_channels)`` of the condition vector, broadcast
  over the image as ``condition_channels`` extra input channels (the seed: 5);
* ``timestep_embedding``: ``Linear(A + 1, time_embed_dim)`` added to the timestep embedding
  (``UNet2DModel(class_embed_type="identity")``), so every ResNet block sees the condition;
* ``none``: the same network without a condition (the seed's unconditional comparison).

**Condition vector** (:func:`condition_vector`): the ``A`` attributes as 0/1 followed by a presence flag 1.
The **null condition** (:func:`null_condition`) is all zeros: the flag 0 tells it from "every attribute 0"
(flag 1), which a plain multi-hot vector cannot (anchors.md: multi-label CFG needs a null the model can tell
from all-zero). Training replaces a share ``condition_dropout`` of the rows by the null condition
(:func:`drop_conditions`), so one network learns both ``eps(x, t, c)`` and ``eps(x, t, null)``.

**Guidance** (``pipelines.sampling.sample_conditioned``): ``eps = eps_null + w (eps_cond - eps_null)``, the
convention of diffusers' pipelines (and of our text sampler): ``w = 1`` is the conditional model, ``w = 0``
the null condition's prediction (the model's own attribute prior), ``w > 1`` guidance. Ho & Salimans (2022)
write the same rule as ``(1 + w') eps_cond - w' eps_null``, so their ``w'`` is our ``w - 1``. The issue asked
for "scale 0 equals the conditional model" in theirs and for the formula above in ours; we keep one
convention, diffusers', everywhere.

**Noise**: DDPM, 1,000 steps, cosine schedule (``squaredcos_cap_v2``), epsilon target; sampled by DDPM at its
1,000 steps or by DDIM / DPM-Solver++ at few steps (:func:`sampling_scheduler`). Pixels are scaled once, from
[0, 1] to [-1, 1] (:func:`to_model_range`; the seed's notebook normalised twice, to [-3, 1]).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

CONDITIONINGS = ("none", "input_channels", "timestep_embedding")
#: the seed's network: 64 px, four levels, attention in the two lower ones
SEED_CHANNELS = (32, 32, 32, 64)
SAMPLERS = ("ddpm", "ddim", "dpm")


def _block_types(levels: int, attention_levels: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down and up block types: plain blocks on top, attention in the lowest ``attention_levels``."""
    down = tuple("AttnDownBlock2D" if i >= levels - attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if i < attention_levels else "UpBlock2D" for i in range(levels))
    return down, up


class AttributeUNet(ModelMixin, ConfigMixin):
    """``UNet2DModel`` plus a linear projection of the condition vector (module docstring).

    ``forward(sample, timestep, condition=None)`` returns the predicted noise (``UNet2DOutput``, or a ``(noise,)`` tuple with
    ``return_dict=False``, like diffusers' models); ``condition`` is ``(B, num_attributes + 1)`` (see
    :func:`condition_vector`), required unless ``conditioning == "none"``. ``config.in_channels`` is the image's
    channel count (3): the loop draws noise of that shape. ``save_pretrained`` / ``from_pretrained`` as any
    diffusers model.
    """

    @register_to_config
    def __init__(self, num_attributes: int = 40, conditioning: str = "input_channels", sample_size: int = 64,
                 in_channels: int = 3, block_out_channels: Sequence[int] = SEED_CHANNELS, layers_per_block: int = 2,
                 attention_levels: int = 2, condition_channels: int = 5, norm_num_groups: int = 32):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning {conditioning!r} is not one of {', '.join(CONDITIONINGS)}")
        if not 0 <= attention_levels <= len(block_out_channels):
            raise ValueError(f"attention_levels {attention_levels} is not in 0..{len(block_out_channels)}")
        down, up = _block_types(len(block_out_channels), attention_levels)
        extra = condition_channels if conditioning == "input_channels" else 0
        time_embed_dim = block_out_channels[0] * 4  # UNet2DModel's
        self.unet = UNet2DModel(sample_size=sample_size, in_channels=in_channels + extra, out_channels=in_channels,
                                block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                                down_block_types=down, up_block_types=up, norm_num_groups=norm_num_groups,
                                class_embed_type="identity" if conditioning == "timestep_embedding" else None)
        width = {"none": 0, "input_channels": condition_channels, "timestep_embedding": time_embed_dim}[conditioning]
        self.condition_proj = torch.nn.Linear(num_attributes + 1, width) if width else None

    @property
    def conditioned(self) -> bool:
        """Whether the network takes a condition."""
        return self.config.conditioning != "none"

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                condition: torch.Tensor | None = None, return_dict: bool = True) -> Any:
        kind = self.config.conditioning
        if kind != "none" and condition is None:
            raise ValueError(f"this {kind}-conditioned network needs a condition (null_condition for none)")
        if kind == "none" and condition is not None:
            raise ValueError("this unconditional network takes no condition")
        class_labels = None
        if kind != "none":
            want = (sample.shape[0], self.config.num_attributes + 1)
            if tuple(condition.shape) != want:
                raise ValueError(f"condition of shape {tuple(condition.shape)}, expected {want}")
            projected = self.condition_proj(condition.to(self.condition_proj.weight.dtype))
            if kind == "input_channels":
                planes = projected[:, :, None, None].expand(-1, -1, *sample.shape[2:]).to(sample.dtype)
                sample = torch.cat([sample, planes], dim=1)
            else:
                class_labels = projected
        noise = self.unet(sample, timestep, class_labels=class_labels, return_dict=False)[0]
        return UNet2DOutput(sample=noise) if return_dict else (noise,)


def build_model(num_attributes: int, conditioning: str, resolution: int, block_out_channels: Sequence[int],
                condition_channels: int = 5, attention_levels: int = 2, seed: int = 0) -> AttributeUNet:
    """A freshly initialised :class:`AttributeUNet` (weights drawn under ``torch.manual_seed(seed)``)."""
    torch.manual_seed(seed)
    groups = min(32, min(block_out_channels))
    return AttributeUNet(num_attributes=num_attributes, conditioning=conditioning, sample_size=resolution,
                         block_out_channels=tuple(block_out_channels), condition_channels=condition_channels,
                         attention_levels=attention_levels, norm_num_groups=groups)


def condition_vector(attributes: torch.Tensor) -> torch.Tensor:
    """``(B, A)`` 0/1 attributes -> ``(B, A + 1)`` float condition vectors: the attributes, then the flag 1."""
    attributes = torch.as_tensor(attributes, dtype=torch.float32)
    if attributes.dim() != 2:
        raise ValueError(f"attributes must be (B, A), got shape {tuple(attributes.shape)}")
    return torch.cat([attributes, torch.ones(attributes.shape[0], 1)], dim=1)


def null_condition(n: int, num_attributes: int) -> torch.Tensor:
    """``n`` null conditions: all zeros, the presence flag included (told apart from "every attribute 0")."""
    return torch.zeros(n, num_attributes + 1)


def drop_conditions(conditions: torch.Tensor, probability: float, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each row by the null condition with ``probability`` (one draw per row from ``generator``);
    returns the conditions and the boolean mask of dropped rows."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"condition dropout must be in [0, 1], got {probability!r}")
    drop = torch.rand(conditions.shape[0], generator=generator) < probability
    return torch.where(drop[:, None], torch.zeros_like(conditions), conditions), drop


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the network's [-1, 1] (the only pixel scaling anywhere)."""
    return images * 2 - 1


def noise_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2") -> Any:
    """The training noise: ``DDPMScheduler`` with the seed's 1,000 steps and cosine schedule, epsilon target."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type="epsilon", clip_sample=True)


def sampling_scheduler(kind: str, config: Any) -> Any:
    """A sampler over the training schedule ``config``: ``ddpm`` (ancestral, as trained), ``ddim`` (eta 0) or
    ``dpm`` (DPM-Solver++ 2M)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
    if kind not in classes:
        raise ValueError(f"sampler {kind!r} is not one of {', '.join(SAMPLERS)}")
    return classes[kind].from_config(config)


def sampler_models(model: AttributeUNet, scheduler: Any) -> Any:
    """The :class:`~pipelines.sampling.SamplerModels` of a pixel-space DDPM (no text, no VAE)."""
    from pipelines.sampling import SamplerModels

    return SamplerModels(unet=model, scheduler=scheduler)


def generate(model: AttributeUNet, scheduler: Any, attributes: torch.Tensor | None, seeds: Sequence[int],
             num_inference_steps: int, guidance_scale: float = 1.0, batch_size: int = 64) -> torch.Tensor:
    """Images ``(N, 3, R, R)`` in [0, 1] for ``attributes`` (``(N, A)`` 0/1; None for an unconditional network),
    one per seed, in batches, through the shared sampling loop with classifier-free guidance ``guidance_scale``."""
    from pipelines.sampling import sample_conditioned

    models = sampler_models(model, scheduler)
    device, out = model.device, []
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start:start + batch_size])
        if model.conditioned:
            if attributes is None:
                raise ValueError("a conditioned network needs target attributes")
            rows = attributes[start:start + batch_size]
            cond = {"condition": condition_vector(rows).to(device, model.dtype)}
            null = {"condition": null_condition(len(chunk), model.config.num_attributes).to(device, model.dtype)}
        else:
            cond, null = {}, None
        out.append(sample_conditioned(models, cond, null, chunk, model.config.sample_size, num_inference_steps,
                                      guidance_scale).cpu())
    return torch.cat(out) if out else torch.zeros(0, 3, model.config.sample_size, model.config.sample_size)


def load_model(model_dir: str | Path) -> tuple[AttributeUNet, Any]:
    """A trained :class:`AttributeUNet` and its training scheduler from a folder written by the trainer."""
    from diffusers import DDPMScheduler

    root = Path(model_dir)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} holds no DDPM (no config.json): run train_ddpm first")
    return AttributeUNet.from_pretrained(root), DDPMScheduler.from_pretrained(root)
