"""The SD and ControlNet stand-ins keep every shape rule of the real models (SD 2.1-base + a ControlNet made
with ``from_unet``) at tiny width: VAE downscale 8, the real condition embedding, and one training step of
diffusers' stock ``examples/controlnet/train_controlnet.py`` loop runs on the saved stand-in folder."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pipelines.model_store import make_standin
from pipelines.standins import stable_diffusion as SD

RES = 64  # the sample profile's resolution
LATENT = RES // 8


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory):
    """The stand-in SD folder exactly as the fetch_models stage writes data/models/sd_base."""
    dest = tmp_path_factory.mktemp("models") / "sd_base"
    make_standin("sd_base", dest)
    return dest


@pytest.fixture(scope="module")
def parts(sd_base):
    """The frozen parts loaded the way the stock script loads them: ``from_pretrained(root, subfolder=...)``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, PretrainedConfig

    root = str(sd_base)
    assert PretrainedConfig.from_pretrained(root, subfolder="text_encoder").architectures[0] == "CLIPTextModel"
    return dict(
        tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer", use_fast=False),
        noise_scheduler=DDPMScheduler.from_pretrained(root, subfolder="scheduler"),
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(root, subfolder="vae"),
        unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet"),
    )


def face(k: int) -> Image.Image:
    img = Image.new("RGB", (RES + 16, RES), (90, 60 + 20 * k, 50))  # not square: the transform crops
    ImageDraw.Draw(img).ellipse([20, 10, 60, 56], fill=(200, 160, 140))
    return img


def landmarks(k: int) -> Image.Image:
    img = Image.new("RGB", (2 * RES, 2 * RES))  # bigger than RES: the transform resizes
    d = ImageDraw.Draw(img)
    d.line([(30 + 5 * k, 40), (100, 90 - 5 * k)], fill=(0, 255, 0), width=3)
    d.ellipse([40, 50, 60, 60], fill=(255, 0, 255))
    return img


def test_vae_downscales_by_8_like_sds(parts):
    vae, unet, text = parts["vae"], parts["unet"], parts["text_encoder"]
    cfg = vae.config
    assert len(cfg.block_out_channels) == 4 and 2 ** (len(cfg.block_out_channels) - 1) == 8
    assert cfg.latent_channels == 4 and cfg.scaling_factor == 0.18215 and cfg.sample_size == RES
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, RES, RES)).latent_dist.sample()
        assert z.shape == (1, 4, LATENT, LATENT)
        assert vae.decode(z).sample.shape == (1, 3, RES, RES)
    # the UNet: SD 2.1-base's rules at tiny width
    u = unet.config
    assert u.sample_size * 8 == RES and u.in_channels == u.out_channels == cfg.latent_channels
    assert u.cross_attention_dim == text.config.hidden_size and u.use_linear_projection
    assert u.down_block_types[0] == "CrossAttnDownBlock2D" and u.down_block_types[-1] == "DownBlock2D"
    assert u.up_block_types[0] == "UpBlock2D" and u.up_block_types[-1] == "CrossAttnUpBlock2D"
    heads = u.attention_head_dim  # SD 2.x's config names the number of heads so
    assert all(c % h == 0 and c % u.norm_num_groups == 0 for c, h in zip(u.block_out_channels, heads, strict=True))
    assert LATENT % 2 ** (len(u.block_out_channels) - 1) == 0  # the 8x8 latent halves at every down block


def test_controlnet_from_unet_has_the_real_condition_embedding(parts, tmp_path):
    from diffusers import ControlNetModel

    unet, text = parts["unet"], parts["text_encoder"]
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet)  # as the stock script does: no arguments
    assert tuple(controlnet.config.conditioning_embedding_out_channels) == (16, 32, 96, 256) == SD.CONDITIONING_CHANNELS
    saved = ControlNetModel.from_pretrained(str(SD.build_controlnet_standin(tmp_path / "cn", seed=0)))
    for key in ("conditioning_embedding_out_channels", "block_out_channels", "cross_attention_dim",
                "down_block_types", "attention_head_dim", "use_linear_projection"):
        assert tuple(np.atleast_1d(saved.config[key])) == tuple(np.atleast_1d(controlnet.config[key])), key

    # the UNet's own skip connections and mid-block output, to compare the residuals with
    seen = {"down": []}

    def skips(module, args, out):  # conv_in's output, then every down block's (hidden, skips) output
        seen["down"].extend([out.shape] if module is unet.conv_in else [r.shape for r in out[1]])

    def mid_out(module, args, out):
        seen["mid"] = out.shape

    hooks = [m.register_forward_hook(skips) for m in (unet.conv_in, *unet.down_blocks)]
    hooks.append(unet.mid_block.register_forward_hook(mid_out))
    latents, t = torch.randn(2, 4, LATENT, LATENT), torch.tensor([10, 500])
    enc = text(torch.full((2, 77), 513))[0]
    cond = torch.rand(2, 3, RES, RES)  # a 64 px condition: the embedding brings it down by 8
    with torch.no_grad():
        down, mid = controlnet(latents, t, encoder_hidden_states=enc, controlnet_cond=cond, return_dict=False)
        out = unet(latents, t, encoder_hidden_states=enc, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
    for h in hooks:
        h.remove()
    assert [r.shape for r in down] == seen["down"] and mid.shape == seen["mid"]
    assert out.shape == latents.shape and down[0].shape[-2:] == (LATENT, LATENT)


def test_one_training_step_the_stock_example_way(parts, tmp_path):
    """The loop of diffusers' examples/controlnet/train_controlnet.py (transforms, tokenisation, VAE latents
    times the scaling factor, DDPM noise, ControlNet residuals into the UNet, MSE to the noise) on data
    written as the assemble stage writes it; it crashed at step 0 when the stand-in VAE downscaled by 2."""
    import datasets
    from diffusers import ControlNetModel
    from torchvision import transforms

    from pipelines.facesynthetics_dataset import SCHEMA
    from pipelines.hfdata import ParquetShardWriter

    tok, sched, text, vae, unet = (parts[k] for k in ("tokenizer", "noise_scheduler", "text_encoder", "vae", "unet"))
    with ParquetShardWriter(tmp_path / "ds", "train", SCHEMA.features) as w:
        for k in range(2):
            w.write({"id": f"{k:06d}", "image": face(k), "conditioning_image": landmarks(k), "text": f"a face {k}",
                     "landmarks": np.zeros((68, 2), np.float32), "headpose": [0.0] * 6, "face_box": [0.0, 0, 1, 1],
                     "source_landmarks": np.zeros((70, 2), np.float32), "segmentation": np.zeros((8, 8), np.uint8)})
    rows = datasets.load_dataset(str(tmp_path / "ds"), split="train", cache_dir=str(tmp_path / "cache"))
    image_tf = transforms.Compose([transforms.Resize(RES, interpolation=transforms.InterpolationMode.BILINEAR),
                                   transforms.CenterCrop(RES), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    cond_tf = transforms.Compose([transforms.Resize(RES, interpolation=transforms.InterpolationMode.BILINEAR),
                                  transforms.CenterCrop(RES), transforms.ToTensor()])
    batch = {
        "pixel_values": torch.stack([image_tf(im.convert("RGB")) for im in rows["image"]]),
        "conditioning_pixel_values": torch.stack([cond_tf(im.convert("RGB")) for im in rows["conditioning_image"]]),
        "input_ids": tok(list(rows["text"]), max_length=tok.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids,
    }

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet)
    for m in (vae, unet, text):
        m.requires_grad_(False)
    controlnet.train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-3)
    zero_conv = controlnet.controlnet_down_blocks[0].weight
    cond_out = controlnet.controlnet_cond_embedding.conv_out.weight
    assert zero_conv.abs().max() == 0 and cond_out.abs().max() == 0  # from_unet's zero convolutions
    losses = []
    for _ in range(2):  # step 1 moves the zero convolutions; step 2 lets the condition reach the loss
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy_latents = sched.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text(batch["input_ids"])[0]
        down, mid = controlnet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                               controlnet_cond=batch["conditioning_pixel_values"], return_dict=False)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                          down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        assert sched.config.prediction_type == "epsilon"
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        assert latents.shape == (2, 4, LATENT, LATENT)
    assert all(np.isfinite(losses)) and zero_conv.abs().max() > 0 and cond_out.abs().max() > 0
    controlnet.save_pretrained(tmp_path / "out")  # the stock script's last act
    assert ControlNetModel.from_pretrained(str(tmp_path / "out")).config.conditioning_embedding_out_channels
