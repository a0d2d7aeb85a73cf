"""Generation: tiny stand-ins load through the real loader; fixed seeds, batch invariance, the grid, the stage."""
import json

import datasets
import numpy as np
import pytest
import torch
import yaml
from conftest import committed_params
from PIL import Image, ImageDraw
from test_reports import assert_readable_metrics

from pipelines import generation as G
from pipelines.facesynthetics_dataset import SCHEMA
from pipelines.hfdata import ParquetShardWriter
from pipelines.model_store import make_standin
from pipelines.reports import provenance_path, read_json
from pipelines.standins import stable_diffusion as SD
from stages import generate as S
from stages.config import ParamError, load

RES, STEPS, CFG = 64, 2, 7.5


def condition(k: int, size: int = 128) -> Image.Image:
    """A landmark-like drawing: coloured lines on black, different per k."""
    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    d.line([(10 + 9 * k, 20), (size - 20, size - 10 - 7 * k)], fill=(0, 255, 0), width=4)
    d.ellipse([30, 30 + 5 * k, 60, 50 + 5 * k], fill=(255, 0, 255))
    return img


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return SD.build_sd_standin(root / "sd_base", seed=0), SD.build_controlnet_standin(root / "controlnet", seed=0)


@pytest.fixture(scope="module")
def pipe(standins):
    return G.load_controlnet_pipeline(*standins, scheduler="unipc", device="cpu", precision="fp32")


def gen(pipe, conds, prompts, seeds):
    return G.generate_images(pipe, conds, prompts, seeds, RES, STEPS, CFG, 1.0, "")


def test_standins_have_the_real_layout_and_load(standins, pipe):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel, UniPCMultistepScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    sd, cn = standins
    for sub in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert (sd / sub).is_file(), sub
    assert (cn / "config.json").is_file() and (cn / "diffusion_pytorch_model.safetensors").is_file()
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.controlnet, ControlNetModel)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.scheduler, UniPCMultistepScheduler)
    assert pipe.safety_checker is None and pipe.unet.dtype == torch.float32
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size * 8 == RES  # SD's downscale
    assert json.loads((sd / "scheduler/scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"


def test_controlnet_standin_bytes_are_reproducible(tmp_path):
    a, b = SD.build_controlnet_standin(tmp_path / "a", 0), SD.build_controlnet_standin(tmp_path / "b", 0)
    c = SD.build_controlnet_standin(tmp_path / "c", 1)
    w = "diffusion_pytorch_model.safetensors"
    assert (a / w).read_bytes() == (b / w).read_bytes() != (c / w).read_bytes()


def test_fixed_seeds_and_batch_invariance(pipe):
    conds, prompts, seeds = [condition(k) for k in range(3)], ["a face", "a man smiling", "x"], [11, 12, 13]
    batch = gen(pipe, conds, prompts, seeds)
    assert len(batch) == 3 and all(im.size == (RES, RES) and im.mode == "RGB" for im in batch)
    singles = [gen(pipe, [c], [p], [s])[0] for c, p, s in zip(conds, prompts, seeds, strict=True)]
    for b, s in zip(batch, singles, strict=True):  # each image depends on its own seed only
        diff = np.abs(pixels(b) - pixels(s))
        assert diff.max() <= 1 and diff.mean() < 0.05
    again = gen(pipe, conds[:1], prompts[:1], [11])[0]
    assert np.array_equal(pixels(again), pixels(singles[0]))  # same seed: identical pixels
    other_seed = gen(pipe, conds[:1], prompts[:1], [99])[0]
    other_cond = gen(pipe, conds[1:2], prompts[:1], [11])[0]
    assert np.abs(pixels(other_seed) - pixels(singles[0])).mean() > 1.0
    assert not np.array_equal(pixels(other_cond), pixels(singles[0]))  # the ControlNet sees the condition
    with pytest.raises(ValueError, match="one of each"):
        gen(pipe, conds, prompts[:2], seeds)


def test_scheduler_names_map_to_classes(tmp_path):
    expected = {"unipc": "UniPCMultistepScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                "dpm": "DPMSolverMultistepScheduler"}
    from diffusers import PNDMScheduler

    config = PNDMScheduler(**SD.SD_SCHEDULER).config
    for name, cls in expected.items():
        sched = G.make_scheduler(name, config)
        assert type(sched).__name__ == cls and sched.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="'plms' is not one of"):
        G.make_scheduler("plms", config)
    with pytest.raises(ValueError, match="'plms' is not one of"):
        G.load_controlnet_pipeline(tmp_path, tmp_path, "plms")


def test_upcast_vae_decode_takes_half_latents():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = G.upcast_vae_decode(AutoencoderKL(**SD.TINY_VAE).to(torch.bfloat16))
    assert vae.dtype == torch.float32
    out = vae.decode(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), return_dict=False)[0]
    assert out.dtype == torch.float32 and out.shape == (1, 3, 64, 64)


def test_sample_grid_layout():
    solid = lambda c: Image.new("RGB", (40, 30), c)  # noqa: E731 - any input size is resized to the cell
    conds, gens = [solid("red"), solid("lime")], [solid("blue"), solid("white")]
    grid = G.sample_grid(conds, gens, n=2, cell=10)
    assert grid.size == (20, 20)
    assert grid.getpixel((5, 5)) == (255, 0, 0) and grid.getpixel((15, 5)) == (0, 0, 255)
    assert grid.getpixel((5, 15)) == (0, 255, 0) and grid.getpixel((15, 15)) == (255, 255, 255)
    assert G.sample_grid(conds, gens, n=5, cell=10).size == (20, 20)  # only as many rows as pairs
    assert G.sample_grid(conds, gens, n=1, cell=8).size == (16, 8)
    with pytest.raises(ValueError):
        G.sample_grid([], [], n=2, cell=8)
    labelled = np.asarray(G.sample_grid(conds, gens, n=2, cell=64, labels=["a cat", ""]))
    plain = np.asarray(G.sample_grid(conds, gens, n=2, cell=64))
    changed = np.argwhere((labelled != plain).any(axis=2))
    assert len(changed) and changed[:, 1].max() < 64 and changed[:, 0].min() >= 32  # bottom of row 0's condition
    assert changed[:, 0].max() < 64  # the empty label of row 1 writes nothing


def test_seed_for_known_answers():
    assert G.seed_for("000000", 0) == 1397146690
    assert G.seed_for("000001", 0) == 1703261752
    assert G.seed_for("000000", 1) == 94549754
    assert 0 <= G.seed_for("anything", 123) < 2**31


# --- the stage -------------------------------------------------------------------------------------------

VAL_IDS = ["000007", "000003", "000005"]  # unsorted on purpose


def write_dataset(out):
    features = SCHEMA.features
    small = np.zeros((8, 8, 3), np.uint8)

    def row(sid, k):
        return {"id": sid, "image": small, "conditioning_image": condition(k), "text": f"a rendered face {k}",
                "landmarks": np.zeros((68, 2), np.float32), "headpose": [0.0] * 6, "face_box": [0.0, 0, 1, 1],
                "source_landmarks": np.zeros((70, 2), np.float32), "segmentation": np.zeros((8, 8), np.uint8)}

    with ParquetShardWriter(out, "validation", features) as w:
        for k, sid in enumerate(VAL_IDS):
            w.write(row(sid, k))
    with ParquetShardWriter(out, "train", features) as w:
        w.write(row("000001", 9))


MODEL = "uncannyfaces_25K"


@pytest.fixture
def workdir(tmp_path, monkeypatch, repo_root):
    params = committed_params()
    params["base"].update(profile="sample", device="cpu")
    params["generate"].update(max_images=2, off_distribution_conditions=5)  # capped at the 2 conditions
    params["generate"].update(grid_size=3, off_distribution_prompts=["a cat", "a red sports car"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_dataset(tmp_path / S.DATASET_DIR)
    make_standin("sd_base", tmp_path / S.SD_DIR)
    make_standin("controlnet", tmp_path / params["controlnets"][MODEL])
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path, params


def test_stage_end_to_end(workdir, pipe):
    root, params = workdir
    out = root / "data/generated" / MODEL
    (out / "images").mkdir(parents=True)
    (out / "images/stale.png").write_bytes(b"old")  # emptied first
    summary = S.main(["--model", MODEL, "--controlnet", params["controlnets"][MODEL]])

    assert sorted(p.name for p in (out / "images").iterdir()) == ["000003.png", "000005.png"]
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["id"] for m in meta] == ["000003", "000005"]
    assert meta[0] == {"file_name": "images/000003.png", "id": "000003", "prompt": "a rendered face 1",
                       "seed": G.seed_for("000003", 0)}
    first = Image.open(out / "images/000003.png")
    assert first.size == (RES, RES)
    # the stage's image is the one generate_images makes from that condition, prompt and seed
    expected = gen(pipe, [condition(1)], ["a rendered face 1"], [G.seed_for("000003", 0)])[0]
    assert np.abs(pixels(first) - pixels(expected)).max() <= 1

    # off-distribution: every prompt on every condition, with the condition's own seed
    off = [json.loads(line) for line in (out / "off_distribution.jsonl").read_text().splitlines()]
    assert [(m["prompt_index"], m["id"]) for m in off] == [(0, "000003"), (0, "000005"), (1, "000003"), (1, "000005")]
    assert off[2] == {"file_name": "off_distribution/01_000003.png", "id": "000003", "prompt": "a red sports car",
                      "prompt_index": 1, "seed": G.seed_for("000003", 0)}
    car = Image.open(out / off[2]["file_name"])
    expected = gen(pipe, [condition(1)], ["a red sports car"], [G.seed_for("000003", 0)])[0]
    assert np.abs(pixels(car) - pixels(expected)).max() <= 1
    assert np.abs(pixels(car) - pixels(first)).max() > 1  # same condition and seed: the prompt changed it

    saved = read_json(out / "summary.json")
    assert saved["count"] == summary["count"] == 2 and saved["uses_standin_models"] is True
    assert saved["off_distribution"] | {"grid": None} == {"prompts": 2, "conditions": 2, "images": 4, "grid": None}
    assert saved["images_made"] == 6 and saved["controlnet_dir"] == params["controlnets"][MODEL]
    assert saved["models"]["sd_base"]["standin"] and saved["models"]["controlnet"]["standin"]
    assert saved["params"]["scheduler"] == "unipc" and "STAND-IN" in saved["note"]
    assert "seconds" not in saved and "images_per_second" not in saved  # a data output: no timings
    assert saved["runtime"]["device"] == "cpu" and saved["runtime"]["precision"] == "fp32"

    grid = Image.open(root / "reports/plots/samples" / f"{MODEL}.png")
    assert grid.size == (2 * RES, 2 * RES)  # grid_size 3, but 2 images were made
    assert np.array_equal(np.asarray(grid)[:RES, RES:], np.asarray(first.convert("RGB")))  # row 0 = 000003
    off_grid = Image.open(root / "reports/plots/samples" / f"{MODEL}_off_distribution.png")
    assert off_grid.size == (2 * RES, 2 * RES)  # one row per prompt, on the first condition
    assert np.array_equal(np.asarray(off_grid)[RES:, RES:], np.asarray(car.convert("RGB")))

    bench = read_json(S.bench_path(MODEL))
    assert bench["images"] == 2 and bench["batch_4"]["batch_size"] == 4 and bench["batch_1"]["images_per_second"] > 0
    assert bench["generation"]["images"] == 6 and bench["generation"]["images_per_second"] > 0  # the whole run
    details = read_json(provenance_path(S.bench_path(MODEL)))
    assert bench["uses_standin_models"] is True and details["device"] == "cpu" and "STAND-IN" in details["note"]
    assert details["models"]["controlnet"]["standin"] and details["model_name"] == MODEL
    assert assert_readable_metrics(S.bench_path(MODEL))["resolution"] == RES


def test_bad_model_name_and_missing_controlnet_are_named(workdir):
    with pytest.raises(ParamError, match="--model: '../x' must be a plain folder name"):
        S.main(["--model", "../x", "--controlnet", "data/models/controlnet"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        S.main(["--model", "other", "--controlnet", "nowhere"])


@pytest.mark.parametrize("key,value", [("scheduler", "plms"), ("batch_size", 0), ("resolution", 60),
                                       ("max_images", 0),
                                       ("precision", "fp8"), ("off_distribution_prompts", []),
                                       ("off_distribution_prompts", ["a cat", "a cat"]),
                                       ("off_distribution_conditions", 0)])
def test_bad_params_are_named(repo_root, key, value):
    params = committed_params()
    params["generate"][key] = value
    with pytest.raises(ParamError, match=f"generate.{key}"):
        load(S.GenerateConfig, "generate", params, "sample")


def test_repo_params_parse_for_both_profiles(repo_root):
    params = committed_params()
    for profile in ("sample", "real"):
        _, cfg = load(S.GenerateConfig, "generate", params, profile)
        assert cfg.scheduler == "unipc"
    assert load(S.GenerateConfig, "generate", params, "real")[1].resolution == 512
