"""Stand-ins for Stable Diffusion 2.1-base and its landmark ControlNet: the real diffusers/transformers classes
at tiny width, random weights, saved with ``save_pretrained`` in the real snapshots' layout, so
:func:`pipelines.generation.load_controlnet_pipeline` and the training stage load them like the real ones.
They work at 64 px with SD's shape rules (VAE downscale 8, the real condition embedding): tests/test_standins_shapes.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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
    :func:`pipelines.standins.tokenizers.build_clip_tokenizer`), ``scheduler/`` (SD 2.1-base's PNDM config) and
    ``model_index.json``, written by ``save_pretrained``; no safety checker or feature extractor. Weights
    are drawn under ``torch.manual_seed(seed)``: the same seed gives the same weights. It works at 64 px
    (any multiple of 16): the VAE downscales by 8 like SD's, so stock SD/ControlNet code runs on it.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.standins.tokenizers import build_clip_tokenizer, load_clip_tokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    unet = _tiny_unet(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    tokenizer = load_clip_tokenizer(build_clip_tokenizer(dest / "tokenizer"))
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
