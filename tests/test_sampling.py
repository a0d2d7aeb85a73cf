"""Our denoising loop: the diffusers pipeline's images at the same seeds, pixel space, the guidance seam."""
from dataclasses import dataclass

import pytest
import torch
from test_generation import condition

from pipelines import generation as G
from pipelines import sampling as S
from pipelines.standins import stable_diffusion as SD

RES, STEPS = 64, 3
PROMPTS, SEEDS = ["a face", "a man smiling"], [11, 12]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return G.load_controlnet_pipeline(SD.build_sd_standin(root / "sd_base", seed=0),
                                      SD.build_controlnet_standin(root / "controlnet", seed=0), "unipc")


@pytest.fixture(scope="module")
def conditions():
    return [G.prepare_condition(condition(k), RES) for k in range(len(PROMPTS))]


@pytest.mark.parametrize("scheduler,guidance_scale,negative,cond_scale", [
    ("unipc", 7.5, "", 1.0), ("ddim", 5.0, "blurry", 0.6), ("euler", 1.0, "", 1.0), ("dpm", 7.5, "", 1.0)])
def test_plain_cfg_gives_the_diffusers_pipeline_images(pipe, conditions, scheduler, guidance_scale, negative,
                                                       cond_scale):
    pipe.scheduler = G.make_scheduler(scheduler, pipe.scheduler.config)
    ref = pipe(prompt=PROMPTS, image=conditions, height=RES, width=RES, num_inference_steps=STEPS,
               guidance_scale=guidance_scale, controlnet_conditioning_scale=cond_scale,
               negative_prompt=[negative] * 2 if guidance_scale > 1 else None,
               generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt").images
    ours = S.sample(S.SamplerModels.from_pipeline(pipe), PROMPTS, SEEDS, RES, STEPS, guidance_scale,
                    S.pil_to_tensor(conditions), cond_scale, negative)
    assert ours.shape == (2, 3, RES, RES) and ours.dtype == torch.float32
    assert (ours - ref).abs().max() <= 1e-5  # bit-identical on CPU here; the margin is for other kernels
    assert (ours[0] - ours[1]).abs().max() > 0.01  # two different images, not one broadcast


def test_generate_images_is_the_loop_rounded_to_8_bits(pipe, conditions):
    pipe.scheduler = G.make_scheduler("unipc", pipe.scheduler.config)
    images = G.generate_images(pipe, conditions, PROMPTS, SEEDS, RES, 2, 7.5)
    ours = S.sample(S.SamplerModels.from_pipeline(pipe), PROMPTS, SEEDS, RES, 2, 7.5, S.pil_to_tensor(conditions))
    assert [im.size for im in images] == [(RES, RES)] * 2
    assert torch.equal(S.pil_to_tensor(images), (ours * 255).round() / 255)


def _pixel_models(pipe, zero_output: bool) -> S.SamplerModels:
    """A pixel-space text-conditioned UNet (3 channels, 16 px) over the stand-in text encoder; no VAE, no ControlNet."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**SD.TINY_UNET, "in_channels": 3, "out_channels": 3, "sample_size": 16}).eval()
    if zero_output:
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return S.SamplerModels(unet, scheduler, pipe.text_encoder, pipe.tokenizer)


def test_pixel_space_known_answer_with_zero_noise_prediction(pipe):
    # eps = 0 makes deterministic DDIM scale x_t by sqrt(abar_prev / abar_t) per step: x_0 = x_T sqrt(abar_end / abar_T)
    models = _pixel_models(pipe, zero_output=True)
    out = S.sample(models, PROMPTS, SEEDS, 16, 2, 7.5)
    sched = models.scheduler
    assert sched.timesteps.tolist() == [501, 1]
    start = torch.cat([torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    expected = (start * (sched.final_alpha_cumprod / sched.alphas_cumprod[501]).sqrt() / 2 + 0.5).clamp(0, 1)
    assert out.shape == (2, 3, 16, 16) and torch.allclose(out, expected, atol=1e-6)


@dataclass
class PullToward:
    """Lowers ||image(pred_x0) - target||^2: the universal-guidance form, needing the gradient w.r.t. x_t."""

    target: torch.Tensor
    scale: float
    needs_grad: bool = True

    def correction(self, ctx: S.GuidanceContext) -> torch.Tensor:
        assert torch.is_grad_enabled() and ctx.latents.requires_grad
        loss = ((ctx.decode(ctx.pred_x0) - self.target) ** 2).sum()
        return self.scale * (1 - ctx.alpha_prod).sqrt() * torch.autograd.grad(loss, ctx.latents)[0]


@dataclass
class Zero:
    needs_grad: bool
    seen: list

    def correction(self, ctx: S.GuidanceContext) -> torch.Tensor:
        assert 0 < ctx.alpha_prod < 1 and torch.isfinite(ctx.pred_x0).all()
        self.seen.append((ctx.step, torch.is_inference_mode_enabled(), ctx.latents.requires_grad, ctx.pred_x0.shape))
        return torch.zeros_like(ctx.noise_pred)


def test_a_gradient_term_pulls_the_image_toward_its_target(pipe):
    models = _pixel_models(pipe, zero_output=False)
    target = torch.full((2, 3, 16, 16), 0.8)
    plain = S.sample(models, PROMPTS, SEEDS, 16, 3, 7.5)
    pulled = S.sample(models, PROMPTS, SEEDS, 16, 3, 7.5, guidance=[PullToward(target, 0.05)])
    harder = S.sample(models, PROMPTS, SEEDS, 16, 3, 7.5, guidance=[PullToward(target, 0.2)])
    errors = [((x - target) ** 2).mean(dim=(1, 2, 3)) for x in (plain, pulled, harder)]
    assert (errors[1] < errors[0]).all() and (errors[2] < errors[1]).all()  # each image, more with a larger scale


@pytest.mark.parametrize("scheduler,needs_grad", [("unipc", False), ("euler", True)])
def test_a_zero_term_changes_nothing_and_grad_is_on_only_when_asked(pipe, conditions, scheduler, needs_grad):
    pipe.scheduler = G.make_scheduler(scheduler, pipe.scheduler.config)
    models = S.SamplerModels.from_pipeline(pipe)
    plain = S.sample(models, PROMPTS, SEEDS, RES, 2, 7.5, S.pil_to_tensor(conditions))
    term = Zero(needs_grad, [])
    with_zero = S.sample(models, PROMPTS, SEEDS, RES, 2, 7.5, S.pil_to_tensor(conditions), guidance=[term])
    assert torch.equal(with_zero, plain)
    latent = (2, 4, RES // 8, RES // 8)
    assert term.seen == [(i, not needs_grad, needs_grad, latent) for i in range(2)]


def test_bad_inputs_are_named(pipe, conditions):
    models = S.SamplerModels.from_pipeline(pipe)
    cond = S.pil_to_tensor(conditions)
    with pytest.raises(ValueError, match="2 prompts, 1 seeds and 2 conditions"):
        S.sample(models, PROMPTS, SEEDS[:1], RES, 2, 7.5, cond)
    with pytest.raises(ValueError, match="conditions are needed with a ControlNet"):
        S.sample(models, PROMPTS, SEEDS, RES, 2, 7.5)
    with pytest.raises(ValueError, match="resolution 60 is not a multiple of the VAE's downscale 8"):
        S.sample(models, PROMPTS, SEEDS, 60, 2, 7.5, cond)
    v_models = S.SamplerModels(**{**vars(models), "scheduler": G.make_scheduler(
        "ddim", {**pipe.scheduler.config, "prediction_type": "v_prediction"})})
    with pytest.raises(ValueError, match="epsilon-predicting model, not 'v_prediction'"):
        S.sample(v_models, PROMPTS, SEEDS, RES, 2, 7.5, cond, guidance=[Zero(False, [])])
