"""The real models' sizes, written down, and random-weight models of those sizes for timing (the GPU check).

The configs below are those of the released checkpoints (Stable Diffusion 2.1-base's ``unet/``, ``vae/`` and
``text_encoder/``, a ControlNet made from that UNet as the landmark ControlNets are, BLIP-large, CLIP ViT-L/14),
so a model built from them costs the real compute and memory; :data:`PARAMETER_COUNTS` are the released
checkpoints' parameter counts, which tests check on the meta device. The builders save them with the real classes
and ``save_pretrained``, in the folders the project's loaders read, with the offline tokenizers of the small
stand-ins (text becomes more tokens, the compute per token is the real one). SPIGA's and Inception's stand-ins
are already of the real size (:mod:`pipelines.standins.spiga`, :mod:`pipelines.standins.inception`).

Nothing here is downloaded and nothing means anything: outputs of random weights are noise; speed is real.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: ``stabilityai/stable-diffusion-2-1-base`` ``unet/config.json`` (the keys that shape the network).
SD21_BASE_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32,
    act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5,
)
#: ``stabilityai/stable-diffusion-2-1-base`` ``vae/config.json``.
SD21_BASE_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215, act_fn="silu",
)
#: ``stabilityai/stable-diffusion-2-1-base`` ``text_encoder/config.json`` (OpenCLIP ViT-H/14's text tower, 23 of
#: its 24 layers, as ``CLIPTextModel``); the special token ids are the offline tokenizer's.
SD21_TEXT_ENCODER: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512, layer_norm_eps=1e-5,
    bos_token_id=512, eos_token_id=513, pad_token_id=513,
)
#: ``Salesforce/blip-image-captioning-large`` ``config.json``: ViT-L/16 at 384 px and a BERT-base text decoder.
BLIP_LARGE_VISION: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=384,
    patch_size=16, layer_norm_eps=1e-5,
)
BLIP_LARGE_TEXT: dict[str, Any] = dict(
    vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=512, encoder_hidden_size=1024,
)
BLIP_LARGE: dict[str, Any] = dict(projection_dim=512, image_text_hidden_size=256)
#: ``openai/clip-vit-large-patch14`` ``config.json``.
CLIP_L14_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu",
)
CLIP_L14_VISION: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, hidden_act="quick_gelu",
)
CLIP_L14: dict[str, Any] = dict(projection_dim=768)

#: Parameters of the released checkpoints (published counts; tests build the configs on the meta device and compare).
#: Not listed, as no count of theirs is published: the ControlNet (``from_unet`` of this UNet: 364,228,240) and
#: BLIP-large (446,290,492 distinct parameters; its file also stores the tied 30524x768 LM head, 469.7 M in all).
PARAMETER_COUNTS = {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840, "clip": 427_616_513}


def sd_unet(seed: int = 0) -> Any:
    """A random-weight SD 2.1-base ``UNet2DConditionModel``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD21_BASE_UNET)


def sd_vae(seed: int = 0) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**SD21_BASE_VAE)


def sd_text_encoder(seed: int = 0) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**SD21_TEXT_ENCODER))


def controlnet_from(unet: Any) -> Any:
    """A ``ControlNetModel`` of ``unet``'s size (its weights copied, diffusers' default condition embedding)."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet)


def blip_large(tokenizer: Any, seed: int = 0) -> Any:
    """A random-weight ``BlipForConditionalGeneration`` of BLIP-large's size, with ``tokenizer``'s special ids."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    ids = {"pad_token_id": tokenizer.pad_token_id, "sep_token_id": tokenizer.sep_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.sep_token_id}
    config = BlipConfig(text_config={**BLIP_LARGE_TEXT, **ids}, vision_config=BLIP_LARGE_VISION, **BLIP_LARGE)
    torch.manual_seed(seed)
    return BlipForConditionalGeneration(config).eval()


def clip_l14(tokenizer: Any, seed: int = 0) -> Any:
    from transformers import CLIPConfig, CLIPModel

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(text_config={**CLIP_L14_TEXT, **ids}, vision_config=CLIP_L14_VISION,
                                **CLIP_L14)).eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_sd_real_size(dest: str | Path, controlnet_dest: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Save a random-weight SD 2.1-base pipeline to ``dest`` and a ControlNet of its UNet's size to
    ``controlnet_dest``, in the layout of :func:`pipelines.standins.stable_diffusion.build_sd_standin` (so the
    generation and training loaders read them); about 6.5 GB of fp32 safetensors."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from pipelines.standins.stable_diffusion import SD_SCHEDULER
    from pipelines.standins.tokenizers import build_clip_tokenizer, load_clip_tokenizer

    dest, controlnet_dest = Path(dest), Path(controlnet_dest)
    unet = sd_unet(seed)
    tokenizer = load_clip_tokenizer(build_clip_tokenizer(dest / "tokenizer"))
    pipe = StableDiffusionPipeline(vae=sd_vae(seed + 1), text_encoder=sd_text_encoder(seed + 2), tokenizer=tokenizer,
                                   unet=unet, scheduler=PNDMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(dest, safe_serialization=True)
    controlnet_from(unet).save_pretrained(controlnet_dest, safe_serialization=True)
    return dest, controlnet_dest


def blip_tokenizer(vocab_size: int = BLIP_LARGE_TEXT["vocab_size"]) -> Any:
    """The BLIP stand-in's offline WordPiece tokenizer padded with filler tokens to ``vocab_size`` entries, so
    every id the real-size decoder can emit decodes."""
    from transformers import BertTokenizerFast

    from pipelines.standins.blip import _standin_vocab

    words = _standin_vocab()
    specials = 2  # [DEC], [ENC] are added below
    words += [f"w{i}" for i in range(vocab_size - len(words) - specials)]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(words)}, do_lower_case=True, model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def build_blip_real_size(dest: str | Path, seed: int = 0) -> Path:
    """Save a random-weight BLIP-large (model + processor with the real image settings) to ``dest``."""
    from transformers import BlipImageProcessor, BlipProcessor

    from pipelines.standins.blip import BLIP_IMAGE_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    dest = Path(dest)
    tokenizer = blip_tokenizer()
    blip_large(tokenizer, seed).save_pretrained(str(dest))
    image_processor = BlipImageProcessor(size={"height": BLIP_IMAGE_SIZE, "width": BLIP_IMAGE_SIZE},
                                         image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, resample=3)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(dest))
    return dest


def build_clip_real_size(dest: str | Path, seed: int = 0) -> Path:
    """Save a random-weight CLIP ViT-L/14 + the real image processor and the offline CLIP tokenizer to ``dest``."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from pipelines.standins.tokenizers import build_clip_tokenizer, load_clip_tokenizer

    dest = Path(dest)
    tokenizer = load_clip_tokenizer(build_clip_tokenizer(dest))
    clip_l14(tokenizer, seed).save_pretrained(str(dest))
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(str(dest))
    return dest
