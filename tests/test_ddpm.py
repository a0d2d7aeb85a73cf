"""The attribute DDPM (pipelines/ddpm.py), its training task (pipelines/training/ddpm.py) and the conditioned front
of the sampling loop (pipelines.sampling.sample_conditioned): guidance-scale identities, the null condition,
condition dropout at its rate, the pixel range the network sees, save/load and resume."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines import ddpm as D
from pipelines.celeba import build_celeba_dataset
from pipelines.sampling import sample_conditioned
from pipelines.sources import celeba as C
from pipelines.training import ddpm as T

RES, CHANNELS, A = 16, (8, 16), 40


def tiny(conditioning: str = "input_channels", seed: int = 0) -> D.AttributeUNet:
    return D.build_model(A, conditioning, RES, CHANNELS, attention_levels=1, seed=seed).eval()


def ddim(steps: int = 3):
    return D.sampling_scheduler("ddim", D.noise_scheduler().config), steps


def random_attributes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2, (n, A), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("celeba_src")
    C.write_sample(root, 30, num_broken=0, seed=1)
    out = tmp_path_factory.mktemp("celeba_ds") / "celeba"
    build_celeba_dataset(root, out, image_size=RES * 2, rows_per_file=16, source_note="rendered")
    return out


def settings(**overrides) -> T.DDPMSettings:
    base = dict(resolution=RES, block_out_channels=CHANNELS, attention_levels=1, train_batch_size=4,
                max_train_steps=4, checkpointing_steps=2, validation_steps=100, num_validation_images=2,
                validation_inference_steps=2, condition_dropout=0.25, seed=3)
    return T.DDPMSettings(**{**base, **overrides})


# ------------------------------------------------------------------------------------------------ the network


@pytest.mark.parametrize("kind, extra", [("none", 0), ("input_channels", 5), ("timestep_embedding", 0)])
def test_network_shapes_follow_the_seed(kind, extra):
    model = tiny(kind)
    assert model.config.in_channels == 3 and model.unet.config.in_channels == 3 + extra
    assert model.unet.config.out_channels == 3
    assert model.unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D")  # attention in the lower level
    seed_net = D.build_model(A, kind, 64, D.SEED_CHANNELS)
    assert seed_net.unet.config.block_out_channels == (32, 32, 32, 64)
    assert seed_net.unet.config.down_block_types[2:] == ("AttnDownBlock2D",) * 2
    if kind == "input_channels":
        assert tuple(seed_net.condition_proj.weight.shape) == (5, A + 1)  # Linear(40 + flag, 5)
    if kind == "timestep_embedding":
        assert seed_net.unet.config.class_embed_type == "identity"
        assert tuple(seed_net.condition_proj.weight.shape) == (32 * 4, A + 1)


@pytest.mark.parametrize("kind", ["input_channels", "timestep_embedding"])
def test_the_condition_changes_the_prediction_and_null_differs_from_all_zero(kind):
    model = tiny(kind)
    x, t = torch.randn(2, 3, RES, RES), torch.tensor([10, 500])
    zeros = D.condition_vector(torch.zeros(2, A))
    null = D.null_condition(2, A)
    assert zeros[:, -1].tolist() == [1.0, 1.0] and null.abs().sum() == 0
    with torch.no_grad():
        with_null = model(x, t, condition=null).sample
        with_zero = model(x, t, condition=zeros).sample
        with_ones = model(x, t, condition=D.condition_vector(torch.ones(2, A))).sample
    assert not torch.allclose(with_null, with_zero) and not torch.allclose(with_zero, with_ones)


def test_forward_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs a condition"):
        tiny()(torch.randn(1, 3, RES, RES), 1)
    with pytest.raises(ValueError, match="takes no condition"):
        tiny("none")(torch.randn(1, 3, RES, RES), 1, condition=D.null_condition(1, A))
    with pytest.raises(ValueError, match="expected"):
        tiny()(torch.randn(1, 3, RES, RES), 1, condition=torch.zeros(1, A))
    with pytest.raises(ValueError, match="conditioning"):
        D.build_model(A, "cross_attention", RES, CHANNELS)
    with pytest.raises(ValueError, match="sampler"):
        D.sampling_scheduler("euler", D.noise_scheduler().config)


def test_noise_schedule_is_the_seeds():
    s = D.noise_scheduler()
    assert s.config.num_train_timesteps == 1000 and s.config.beta_schedule == "squaredcos_cap_v2"
    assert s.config.prediction_type == "epsilon"
    assert 0.99 < float(s.alphas_cumprod[0]) and float(s.alphas_cumprod[-1]) < 1e-4


# ------------------------------------------------------------------------------------------------ guidance


def _generate(model, attrs, scale, seeds=(5, 6)):
    scheduler, steps = ddim()
    return D.generate(model, scheduler, attrs, list(seeds), steps, guidance_scale=scale)


def test_guidance_scale_one_is_the_conditional_model_and_zero_the_null_condition():
    model, attrs = tiny(), random_attributes(2)
    scheduler, steps = ddim()
    cond = {"condition": D.condition_vector(attrs)}
    null = {"condition": D.null_condition(2, A)}
    conditional_only = sample_conditioned(D.sampler_models(model, scheduler), cond, None, [5, 6], RES, steps)
    null_only = sample_conditioned(D.sampler_models(model, scheduler), null, None, [5, 6], RES, steps)
    assert torch.equal(_generate(model, attrs, 1.0), conditional_only)
    assert torch.equal(_generate(model, attrs, 0.0), null_only)
    assert not torch.allclose(conditional_only, null_only)


def test_guided_step_is_null_plus_scale_times_the_difference():
    """One DDIM step by hand against the loop at w = 3 (two passes in one doubled batch)."""
    model, attrs, w = tiny(), random_attributes(2, seed=1), 3.0
    scheduler, _ = ddim()
    got = sample_conditioned(D.sampler_models(model, scheduler), {"condition": D.condition_vector(attrs)},
                             {"condition": D.null_condition(2, A)}, [5, 6], RES, 1, guidance_scale=w)
    from diffusers.utils.torch_utils import randn_tensor

    ref = D.sampling_scheduler("ddim", D.noise_scheduler().config)
    ref.set_timesteps(1)
    x = randn_tensor((2, 3, RES, RES), generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    t = ref.timesteps[0]
    with torch.no_grad():
        e_c = model(x, t, condition=D.condition_vector(attrs)).sample
        e_n = model(x, t, condition=D.null_condition(2, A)).sample
    x0 = ref.step(e_n + w * (e_c - e_n), t, x).prev_sample
    torch.testing.assert_close(got, (x0 / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_unconditional_network_ignores_the_scale_and_images_depend_on_their_own_seed():
    model = tiny("none")
    a = _generate(model, None, 1.0, seeds=(1, 2))
    assert torch.equal(a, _generate(model, None, 5.0, seeds=(1, 2)))
    b = _generate(model, None, 1.0, seeds=(2, 1))
    assert torch.equal(a[0], b[1]) and not torch.equal(a[0], a[1])
    assert a.shape == (2, 3, RES, RES) and 0 <= float(a.min()) and float(a.max()) <= 1
    with pytest.raises(ValueError, match="needs target attributes"):
        _generate(tiny(), None, 1.0)


def test_condition_rows_must_match_the_seeds():
    model = tiny()
    scheduler, steps = ddim()
    with pytest.raises(ValueError, match="one per image"):
        sample_conditioned(D.sampler_models(model, scheduler), {"condition": D.null_condition(3, A)}, None,
                           [1, 2], RES, steps)


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_condition_dropout_happens_at_the_configured_rate(p):
    n = 20000
    conditions = D.condition_vector(torch.ones(n, A))
    out, dropped = D.drop_conditions(conditions, p, torch.Generator().manual_seed(0))
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(float(dropped.float().mean()) - p) <= 5 * sigma + 1e-9
    assert torch.equal(out[dropped], torch.zeros(int(dropped.sum()), A + 1))
    assert torch.equal(out[~dropped], conditions[~dropped])
    with pytest.raises(ValueError, match="dropout"):
        D.drop_conditions(conditions, 1.5, torch.Generator())


def test_the_network_sees_pixels_in_minus_one_to_one_once(dataset, monkeypatch):
    task = T.DDPMTask(settings(), dataset, C.ATTRIBUTES)
    row = task.rows[0]
    px = row["pixel_values"]
    assert px.shape == (3, RES, RES) and row["attributes"].shape == (A,)
    assert -1.0 <= float(px.min()) < -0.5 and 0.5 < float(px.max()) <= 1.0  # [-1, 1], not [0, 1] nor [-3, 1]
    seen = {}
    add_noise = task.scheduler.add_noise

    def spy(x0, noise, t):
        seen["x0"] = x0
        return add_noise(x0, noise, t)

    monkeypatch.setattr(task.scheduler, "add_noise", spy)
    batch = {"pixel_values": torch.stack([task.rows[i]["pixel_values"] for i in range(4)]),
             "attributes": torch.stack([task.rows[i]["attributes"] for i in range(4)])}
    loss, parts = task.loss(task.model, batch, torch.Generator().manual_seed(0))
    assert float(seen["x0"].min()) >= -1 and float(seen["x0"].max()) <= 1
    assert torch.isfinite(loss) and set(parts) == {"null_share"}


def test_attribute_subset_and_unknown_names():
    assert T.attribute_indices(C.ATTRIBUTES, ("Smiling", "Eyeglasses")) == [31, 15]
    assert T.attribute_indices(C.ATTRIBUTES, ()) == list(range(40))
    with pytest.raises(ValueError, match="Smiles"):
        T.attribute_indices(C.ATTRIBUTES, ("Smiles",))


def _weights(path: Path) -> dict:
    return load_file(str(path / "diffusion_pytorch_model.safetensors"))


def test_training_resumes_exactly_and_saves_a_loadable_model(dataset, tmp_path):
    s = settings()
    full = T.train_ddpm(s, dataset, C.ATTRIBUTES, tmp_path / "a", tmp_path / "a_ck", tmp_path / "a_log", cpu=True)
    assert full["finished"] and full["global_step"] == 4
    T.train_ddpm(s, dataset, C.ATTRIBUTES, tmp_path / "b", tmp_path / "b_ck", tmp_path / "b_log", cpu=True,
                 stop_after=2)
    assert not (tmp_path / "b").exists()
    resumed = T.train_ddpm(s, dataset, C.ATTRIBUTES, tmp_path / "b", tmp_path / "b_ck", tmp_path / "b_log", cpu=True)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps_this_run"] == 2
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    shares = np.loadtxt(tmp_path / "a_log/plots/metrics/train/null_share.tsv", skiprows=1)[:, 1]
    assert len(shares) == 4 and set(np.round(shares * 4)) <= {0, 1, 2, 3, 4}  # a share of 4 rows per step
    model, scheduler = D.load_model(tmp_path / "a")
    assert isinstance(model, D.AttributeUNet) and scheduler.config.beta_schedule == "squaredcos_cap_v2"
    attrs = random_attributes(2)
    assert torch.equal(_generate(model.eval(), attrs, 3.0), _generate(D.load_model(tmp_path / "b")[0].eval(), attrs, 3.0))
    card = (tmp_path / "a" / "README.md").read_text()
    assert "OFFLINE" not in card and "eps_null + w (eps_cond - eps_null)" in card and "`Smiling`" in card
    grid = tmp_path / "a_log/plots/images/validation/latest.png"
    assert grid.is_file()


def test_unconditional_run_trains_on_the_same_loop(dataset, tmp_path):
    s = dataclasses.replace(settings(max_train_steps=2), conditioning="none")
    out = T.train_ddpm(s, dataset, C.ATTRIBUTES, tmp_path / "u", tmp_path / "u_ck", tmp_path / "u_log", cpu=True,
                       card={"standin_data": True})
    assert out["finished"]
    model, _ = D.load_model(tmp_path / "u")
    assert model.config.conditioning == "none" and model.condition_proj is None
    shares = np.loadtxt(tmp_path / "u_log/plots/metrics/train/null_share.tsv", skiprows=1)[:, 1]
    assert shares.tolist() == [1.0, 1.0]
    assert "OFFLINE SAMPLE RUN" in (tmp_path / "u" / "README.md").read_text()


@pytest.mark.parametrize("key, value, words", [
    ("block_out_channels", [32, 48], "multiple of 32"),
    ("resolution", 30, "not divisible"),
    ("attention_levels", 5, "more than the 4 levels"),
    ("condition_dropout", 1.5, "[0, 1]"),
    ("attributes", ["Smiles"], "train_ddpm.attributes: unknown attributes Smiles"),
])
def test_stage_config_names_the_bad_key(key, value, words):
    from conftest import committed_params

    from stages import config as Cfg
    from stages.train_ddpm import PARAMS, TrainDDPMConfig

    params = Cfg.declared(committed_params(), PARAMS)
    params["train_ddpm"][key] = value
    with pytest.raises(Cfg.ParamError, match=f"train_ddpm.{key}") as exc:
        Cfg.load(TrainDDPMConfig, "train_ddpm", params, "sample")
    assert words in str(exc.value)
