"""ControlNet training: data contract, deterministic order, loss goes down, exact resume, checkpoint limit,
the saved model loads and generates, the stage end to end, and parameter errors."""
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
from pipelines.errors import PipelineError
from pipelines.facesynthetics_dataset import SCHEMA
from pipelines.hfdata import ParquetShardWriter
from pipelines.model_store import make_standin
from pipelines.reports import provenance_path, read_json
from pipelines.standins import stable_diffusion as SD
from pipelines.training import controlnet as T
from pipelines.training import data as D
from pipelines.training import loop as L
from stages import train_controlnet as S
from stages.config import ParamError, load

RES = 64

#: A fixed copy of the params section this stage reads (per-profile values as in params.yaml).
SECTION = yaml.safe_load("""
train_controlnet:
  pretrained_model: data/models/sd_base
  image_column: image
  conditioning_image_column: conditioning_image
  caption_column: text
  gradient_accumulation_steps: 1
  gradient_checkpointing: false
  checkpoints_total_limit: 2
  validation_guidance_scale: 7.5
  validation_scheduler: unipc
  proportion_empty_prompts: 0.0
  lr_scheduler: constant
  lr_warmup_steps: 0
  adam_weight_decay: 0.01
  max_grad_norm: 1.0
  resolution: {sample: 64, real: 512}
  learning_rate: {sample: 0.0001, real: 1.0e-05}
  train_batch_size: {sample: 2, real: 4}
  mixed_precision: {sample: fp32, real: fp16}
  max_train_steps: {sample: 4, real: 25000}
  checkpointing_steps: {sample: 2, real: 5000}
  validation_steps: {sample: 2, real: 5000}
  num_validation_images: {sample: 2, real: 4}
  validation_inference_steps: {sample: 2, real: 20}
  dataloader_num_workers: {sample: 0, real: 8}
""")


def condition(k: int, size: int = RES) -> Image.Image:
    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    d.line([(4 + 5 * k, 10), (size - 10, size - 5 - 4 * k)], fill=(0, 255, 0), width=3)
    d.ellipse([15, 15 + 3 * k, 30, 25 + 3 * k], fill=(255, 0, 255))
    return img


def face(k: int, size: int = RES) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    arr = np.stack([x * 255, y * 255, np.full_like(x, 40 * k)], -1).astype(np.uint8)
    return Image.fromarray(arr)


def write_dataset(out, n_train: int = 4, n_val: int = 2) -> None:
    features = SCHEMA.features

    def row(sid, k):
        return {"id": sid, "image": face(k), "conditioning_image": condition(k), "text": f"a rendered face {k}",
                "landmarks": np.zeros((68, 2), np.float32), "headpose": [0.0] * 6, "face_box": [0.0, 0, 1, 1],
                "source_landmarks": np.zeros((70, 2), np.float32), "segmentation": np.zeros((8, 8), np.uint8)}

    with ParquetShardWriter(out, "train", features) as w:
        for k in range(n_train):
            w.write(row(f"{k:06d}", k))
    with ParquetShardWriter(out, "validation", features) as w:
        for k in range(n_val):
            w.write(row(f"{100 + k:06d}", 10 + k))


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # accelerate's global state reset around each test


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    sd = root / "sd_base"
    make_standin("sd_base", sd)
    write_dataset(root / "ds")
    return sd, root / "ds", root / "hf_cache"


def settings(**kw) -> T.TrainSettings:
    base = dict(resolution=RES, learning_rate=1e-3, train_batch_size=2, max_train_steps=4, checkpointing_steps=2,
                checkpoints_total_limit=None, validation_steps=100, num_validation_images=2,
                validation_inference_steps=2, seed=0)
    return T.TrainSettings(**{**base, **kw})


def train(assets, root, s, **kw):
    sd, ds, cache = assets
    return T.train_controlnet(s, sd, ds, root / "out", root / "ckpt", root / "logs", cpu=True, cache_dir=cache, **kw)


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "diffusion_pytorch_model.safetensors"))


# --- pure functions ----------------------------------------------------------------------------------------


def test_transform_contract(assets):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(assets[0] / "tokenizer")
    tf = T.make_transform(tok, 32)
    white, black = Image.new("RGB", (96, 48), "white"), Image.new("L", (96, 48), 0)
    out = tf({"image": white, "conditioning_image": white, "text": "ab"})
    assert out["pixel_values"].shape == (3, 32, 32) and torch.allclose(out["pixel_values"], torch.ones(3, 32, 32))
    assert torch.allclose(out["conditioning_pixel_values"], torch.ones(3, 32, 32))  # [0, 1], not [-1, 1]
    out = tf({"image": black, "conditioning_image": black, "text": ""})
    assert torch.allclose(out["pixel_values"], -torch.ones(3, 32, 32)) and out["conditioning_pixel_values"].max() == 0
    # the offline tokenizer: byte tokens (a word's last byte + 256, its '</w>' form), BOS 512, EOS 513 = pad
    ids = T.tokenize(tok, ["ab"])[0]
    assert ids.shape == (77,) and ids[:4].tolist() == [512, 97, 98 + 256, 513] and (ids[4:] == 513).all()
    # centre crop keeps the middle: a left-black / right-white 96x48 image -> 32x32 cut from its centre
    half = np.zeros((48, 96, 3), np.uint8)
    half[:, 48:] = 255
    cp = T.condition_transform(32)(Image.fromarray(half))
    assert cp[:, :, :14].max() == 0 and cp[:, :, 18:].min() == 1
    # DataLoader workers started by spawn/forkserver receive the transform pickled: the same outputs after a round trip
    import pickle

    row = {"image": Image.fromarray(half), "conditioning_image": white, "text": ["ab", "cd"]}
    again = pickle.loads(pickle.dumps(tf))(row)
    for key, value in tf(row).items():
        assert torch.equal(again[key], value), key


def test_data_order_is_a_seeded_stream():
    n = 5
    stream = L.sample_indices(n, seed=3, start=0, count=15)
    for e in range(3):  # each epoch is a permutation, and a different one
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
        assert stream[e * n:(e + 1) * n] == L.epoch_permutation(n, 3, e)
    assert L.epoch_permutation(n, 3, 0) != L.epoch_permutation(n, 3, 1)
    assert L.sample_indices(n, 3, 7, 6) == stream[7:13]  # any window of the same stream
    it = L.batch_stream(n, 3, batch_size=2, start_micro_step=1)
    assert next(it) == stream[2:4] and next(it) == stream[4:6]
    # two processes: micro-step m takes positions [4m, 4m+2) on rank 0 and [4m+2, 4m+4) on rank 1
    assert next(L.batch_stream(n, 3, 2, 1, 1, 2)) == stream[6:8]
    assert L.step_generator(0, 5).initial_seed() == L.step_generator(0, 5).initial_seed() != L.step_generator(0, 6).initial_seed()


def test_conditioning_channels():
    assert T.conditioning_channels(8) == (16, 32, 96, 256)  # diffusers' default, SD's VAE
    assert T.conditioning_channels(8) == SD.CONDITIONING_CHANNELS  # the stand-in's VAE downscales by 8 too
    assert T.conditioning_channels(2) == (16, 32)
    with pytest.raises(ValueError):
        T.conditioning_channels(3)


def test_checkpoint_listing_and_pruning(tmp_path):
    for step in (10, 2, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / L.STEP_FILE).write_text("{}")
    (tmp_path / "checkpoint-40").mkdir()  # incomplete (no step file): ignored, then removed
    assert [s for s, _ in L.list_checkpoints(tmp_path)] == [2, 10, 30]
    L.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-30"]


def test_metrics_log_layout_and_truncate(tmp_path):
    m = L.MetricsLog(tmp_path)
    for step in (1, 2, 3):
        m.log(step, {"loss": 0.5 / step, "lr": 1e-4})
    assert (tmp_path / "plots/metrics/train/loss.tsv").read_text().splitlines()[:2] == ["step\tloss", "1\t0.5"]
    assert read_json(tmp_path / "metrics.json") == {"step": 3, "train": {"loss": 0.166667, "lr": 0.0001}}
    m.truncate(2)
    assert L.read_tsv(tmp_path / "plots/metrics/train/loss.tsv") == [(1, 0.5), (2, 0.25)]


# --- training --------------------------------------------------------------------------------------------


def test_loss_decreases_on_a_fixed_batch(assets):
    c = T.load_components(assets[0], seed=0)
    for m in (c.vae, c.unet, c.text_encoder):
        m.requires_grad_(False)
    tf = T.make_transform(c.tokenizer, RES)
    batch = L.collate([tf({"image": face(k), "conditioning_image": condition(k), "text": f"face {k}"}) for k in (0, 1)])
    opt = torch.optim.AdamW(c.controlnet.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):  # the same noise and timesteps each step: a pure overfit
        loss = T.training_loss(c, c.controlnet, batch, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses  # down at every step
    assert losses[-1] < 0.9 * losses[0], losses  # measured: 1.183 -> 0.988


def test_resume_equals_uninterrupted_and_checkpoint_limit(assets, tmp_path):
    s = settings(checkpointing_steps=1, checkpoints_total_limit=2, gradient_accumulation_steps=2,
                 proportion_empty_prompts=0.5)
    a = train(assets, tmp_path / "a", s)
    assert a["finished"] and a["global_step"] == 4 and a["resumed_from"] is None
    assert sorted(p.name for p in (tmp_path / "a/ckpt").iterdir()) == ["checkpoint-3", "checkpoint-4"]

    sb = settings(checkpointing_steps=2, checkpoints_total_limit=2, gradient_accumulation_steps=2,
                  proportion_empty_prompts=0.5)
    first = train(assets, tmp_path / "b", sb, stop_after=3)  # "interrupted" after step 3: last checkpoint is 2
    assert not first["finished"] and not (tmp_path / "b/out").exists()
    assert [r[0] for r in L.read_tsv(tmp_path / "b/logs/plots/metrics/train/loss.tsv")] == [1, 2, 3]
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    (tmp_path / "b/logs/plots/images/validation").mkdir(parents=True)
    (tmp_path / "b/logs/plots/images/validation/step-3.png").write_bytes(b"stale")  # past the checkpoint
    b = train(assets, tmp_path / "b", sb)
    assert not (tmp_path / "b/logs/plots/images/validation/step-3.png").exists()
    assert b["resumed_from"].endswith("checkpoint-2") and b["steps_this_run"] == 2 and b["finished"]

    wa, wb = weights(tmp_path / "a/out"), weights(tmp_path / "b/out")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    la, lb = (L.read_tsv(tmp_path / f"{x}/logs/plots/metrics/train/loss.tsv") for x in "ab")
    assert [r[0] for r in lb] == [1, 2, 3, 4]  # step 3 of the interrupted run was dropped and redone
    np.testing.assert_allclose([v for _, v in la], [v for _, v in lb], rtol=1e-4)
    # the ControlNet did change: its zero convolutions are not zero any more
    assert wa["controlnet_mid_block.weight"].abs().sum() > 0
    # the process-wide RNG states a checkpoint stores are seeded: a second fresh run, started from other global RNG
    # states (as another process would be), writes the same bytes
    import random

    random.random(), np.random.rand(), torch.rand(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train(assets, tmp_path / "a2", s)
    for name in ("random_states_0.pkl", "model.safetensors", "optimizer.bin"):
        assert (tmp_path / "a/ckpt/checkpoint-4" / name).read_bytes() == \
            (tmp_path / "a2/ckpt/checkpoint-4" / name).read_bytes(), name


def test_a_changed_recipe_is_not_resumed(assets, tmp_path, caplog):
    """Checkpoints of another recipe are discarded, never resumed: the run equals a fresh one."""
    train(assets, tmp_path, settings(max_train_steps=2, checkpointing_steps=2))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    summary = train(assets, tmp_path, settings(max_train_steps=2, checkpointing_steps=2, learning_rate=5e-4))
    assert summary["resumed_from"] is None
    assert "another recipe (learning_rate differ)" in caplog.text


def test_a_changed_dataset_is_not_resumed(assets, tmp_path, caplog):
    """The data is part of a checkpoint's identity: another split of the rows (assemble.validation_count) or
    other rows discard the old checkpoints, and the run trains its steps again."""
    sd, _, cache = assets
    ds, s = tmp_path / "ds", settings(max_train_steps=2, checkpointing_steps=2)

    def run():
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return T.train_controlnet(s, sd, ds, tmp_path / "out", tmp_path / "ckpt", tmp_path / "logs", cpu=True,
                                  cache_dir=cache)

    write_dataset(ds)
    digest = D.dataset_digest(ds)
    assert run()["steps_this_run"] == 2
    assert run()["steps_this_run"] == 0  # the same data: resumed at its target
    write_dataset(ds)  # the same rows written again: the same identity (it is the bytes, not the mtimes)
    assert D.dataset_digest(ds) == digest
    write_dataset(ds, n_train=3, n_val=3)  # one training row fewer (a larger validation_count)
    assert D.dataset_digest(ds) != digest
    summary = run()
    assert summary["resumed_from"] is None and summary["steps_this_run"] == 2 and summary["train_rows"] == 3
    assert "another recipe (dataset differ)" in caplog.text


@pytest.mark.parametrize("checkpointing_steps", [2, 4])
def test_a_shorter_rerun_never_goes_past_its_target(assets, tmp_path, checkpointing_steps):
    """max_train_steps 4 then 2: the 2-step model is shipped, equal to a fresh 2-step run's, and its card and
    summary say 2 steps; checkpoints past the target are removed (with one at step 2 it is resumed, without
    one training starts over)."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    s = dict(checkpointing_steps=checkpointing_steps, validation_steps=2)
    fresh = train(assets, tmp_path / "fresh", settings(max_train_steps=2, **s))
    reset()
    train(assets, tmp_path / "run", settings(max_train_steps=4, **s))
    assert "Optimizer steps: **4**" in (tmp_path / "run/out/README.md").read_text()
    (tmp_path / "run/out/stale.bin").write_bytes(b"of the 4-step run")
    reset()
    short = train(assets, tmp_path / "run", settings(max_train_steps=2, **s))
    assert short["global_step"] == short["steps"] == 2 and short["finished"]
    if checkpointing_steps == 2:
        assert short["resumed_from"].endswith("checkpoint-2") and short["steps_this_run"] == 0
    else:
        assert short["resumed_from"] is None and short["steps_this_run"] == 2
    assert [step for step, _ in L.list_checkpoints(tmp_path / "run/ckpt")] == ([2] if checkpointing_steps == 2 else [])
    card = (tmp_path / "run/out/README.md").read_text()
    assert "Optimizer steps: **2**" in card and "| `max_train_steps` | `2` |" in card
    assert not (tmp_path / "run/out/stale.bin").exists() and not (tmp_path / "run/.out.partial").exists()
    wf, ws = weights(tmp_path / "fresh/out"), weights(tmp_path / "run/out")
    assert wf.keys() == ws.keys() and all(torch.equal(wf[k], ws[k]) for k in wf)
    assert short["final_loss"] == pytest.approx(fresh["final_loss"], rel=1e-6)  # from the log when resumed
    logs = tmp_path / "run/logs"
    assert [step for step, _ in L.read_tsv(logs / "plots/metrics/train/loss.tsv")] == [1, 2]
    assert read_json(logs / "metrics.json")["step"] == 2
    images = logs / "plots/images/validation"
    assert sorted(p.name for p in images.iterdir()) == ["latest.png", "step-2.png"]
    assert (images / "latest.png").read_bytes() == (images / "step-2.png").read_bytes()


def test_a_diverging_run_stops_and_writes_no_model(assets, tmp_path):
    """A learning rate that blows the weights up: a clear error at the first non-finite loss, no final model,
    no checkpoint past the last finite step."""
    with pytest.raises(L.NonFiniteTraining, match=r"the loss is (nan|inf) at step 2; no model was written: "
                                                  r"lower train_controlnet\.learning_rate"):
        train(assets, tmp_path, settings(learning_rate=1e30, checkpointing_steps=1, resolution=32, num_validation_images=0))
    assert not (tmp_path / "out").exists() and [s for s, _ in L.list_checkpoints(tmp_path / "ckpt")] == [1]
    assert [step for step, _ in L.read_tsv(tmp_path / "logs/plots/metrics/train/loss.tsv")] == [1]


def test_non_finite_gradients_stop_the_run(assets, tmp_path, monkeypatch):
    """A finite loss with NaN gradients (d sqrt(x)/dx at 0, times 0) stops before the optimizer step."""
    real = T.training_loss

    def nan_grads(c, controlnet, *args, **kw):
        p = next(controlnet.parameters())
        return real(c, controlnet, *args, **kw) + 0 * torch.sqrt(p - p).sum()

    monkeypatch.setattr(T, "training_loss", nan_grads)
    with pytest.raises(L.NonFiniteTraining, match=r"the gradient norm is nan at step 1 \(loss [0-9.]+\)"):
        train(assets, tmp_path, settings(max_train_steps=2, checkpointing_steps=1, resolution=32, num_validation_images=0))
    assert not (tmp_path / "out").exists() and L.list_checkpoints(tmp_path / "ckpt") == []


def test_check_finite_names_the_weight():
    layer = torch.nn.Linear(2, 2)
    L.check_finite(layer, 3)
    with torch.no_grad():
        layer.bias[1] = float("inf")
    with pytest.raises(L.NonFiniteTraining, match=r"weight bias is not finite after step 3"):
        L.check_finite(layer, 3)


# --- columns, caption lists, checkpointed models ------------------------------------------------------------


def test_a_missing_column_is_refused_before_training(assets, tmp_path):
    with pytest.raises(D.MissingColumn) as err:
        train(assets, tmp_path, settings(caption_column="caption", resolution=32))
    message = str(err.value)
    assert "\n" not in message and message.endswith(
        "(split train) has no column 'caption' (caption_column); its columns: id, image, conditioning_image, text, "
        "landmarks, headpose, face_box, source_landmarks, segmentation")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


def write_caption_list_dataset(out) -> list[list[str]]:
    """Two training and two validation rows whose ``captions`` column holds lists (of 3 and 1 strings, as
    COCO's five per image); returns the validation rows' lists."""
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "conditioning_image": datasets.Image(),
                                  "captions": datasets.List(datasets.Value("string"))})
    lists = [[f"face {k}", f"a face {k}", f"the face {k}"] if k % 2 == 0 else [f"only face {k}"] for k in range(4)]
    for split, ks in (("train", (0, 1)), ("validation", (2, 3))):
        with ParquetShardWriter(out, split, features) as w:
            for k in ks:
                w.write({"id": f"{k:06d}", "image": face(k), "conditioning_image": condition(k), "captions": lists[k]})
    return lists[2:]


def test_a_column_of_caption_lists_trains(assets, tmp_path):
    """A list of captions per row: all tokenized, one drawn per sample with the step's generator in training
    (so a resumed run draws the same), the first in validation."""
    sd, _, cache = assets
    val_lists = write_caption_list_dataset(tmp_path / "ds")
    s = settings(caption_column="captions", resolution=32, max_train_steps=2, validation_steps=2,
                 num_validation_images=2)
    task = T.ControlNetTask(s, sd, tmp_path / "ds", cache_dir=cache)
    assert task.rows[0]["input_ids"].shape == (3, 77) and task.rows[1]["input_ids"].shape == (1, 77)
    assert task.validation_rows[1] == [lst[0] for lst in val_lists]
    summary = L.run_training(task, s, tmp_path / "out", tmp_path / "ckpt", tmp_path / "logs", cpu=True)
    assert summary["finished"] and np.isfinite(summary["final_loss"]) and summary["train_rows"] == 2
    assert (tmp_path / "logs/plots/images/validation/step-2.png").is_file()
    assert "columns `image`, `conditioning_image`, `captions`" in (tmp_path / "out/README.md").read_text()


def test_checkpoints_hold_loadable_controlnets(assets, tmp_path):
    """checkpoint-N/controlnet/ is ControlNetModel.from_pretrained's format and holds the weights of step N."""
    from diffusers import ControlNetModel

    at = {}
    train(assets, tmp_path, settings(max_train_steps=2, checkpointing_steps=1, resolution=32, num_validation_images=0),
          on_step=lambda step, cn: at.__setitem__(step, {k: v.detach().clone() for k, v in cn.state_dict().items()}))
    for step in (1, 2):
        loaded = ControlNetModel.from_pretrained(str(tmp_path / f"ckpt/checkpoint-{step}/controlnet")).state_dict()
        assert loaded.keys() == at[step].keys() and all(torch.equal(loaded[k], at[step][k]) for k in loaded), step
    assert not all(torch.equal(at[1][k], at[2][k]) for k in at[1])
    final = weights(tmp_path / "out")
    assert all(torch.equal(final[k], at[2][k]) for k in final)


def test_saved_model_loads_and_generates(assets, tmp_path):
    from diffusers import ControlNetModel

    summary = train(assets, tmp_path, settings(max_train_steps=2, validation_steps=2),
                    card={"base_model": "standin/sd-tiny", "dataset": "facesynthetics_spiga", "standin": True})
    out = tmp_path / "out"
    cn = ControlNetModel.from_pretrained(str(out))
    assert cn.dtype == torch.float32 and tuple(cn.config.conditioning_embedding_out_channels) == SD.CONDITIONING_CHANNELS
    pipe = G.load_controlnet_pipeline(assets[0], out, "unipc", "cpu", "fp32")
    images = G.generate_images(pipe, [condition(1)], ["a face"], [7], RES, 2, 7.5)
    assert images[0].size == (RES, RES) and np.asarray(images[0]).std() > 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: standin/sd-tiny" in card and "STAND-IN RUN" in card
    assert "| `learning_rate` | `0.001` |" in card and "Optimizer steps: **2**" in card
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    grid = Image.open(tmp_path / "logs/plots/images/validation/step-2.png")
    assert grid.size == (2 * RES, 2 * RES)  # 2 rows of (condition | generated)
    assert (tmp_path / "logs/plots/images/validation/latest.png").read_bytes() == \
        (tmp_path / "logs/plots/images/validation/step-2.png").read_bytes()


def test_mixed_precision_keeps_controlnet_fp32(assets, tmp_path):
    summary = train(assets, tmp_path, settings(max_train_steps=2, validation_steps=2, mixed_precision="bf16",
                                               gradient_checkpointing=True, lr_scheduler="cosine", lr_warmup_steps=1))
    assert summary["mixed_precision"] == "bf16" and summary["finished"]
    assert summary["controlnet_dtype"] == "float32" and summary["frozen_dtype"] == "bfloat16"
    assert np.isfinite(summary["final_loss"]) and (tmp_path / "logs/plots/images/validation/step-2.png").is_file()
    lrs = [v for _, v in L.read_tsv(tmp_path / "logs/plots/metrics/train/lr.tsv")]
    assert lrs == [pytest.approx(1e-3), pytest.approx(0.0, abs=1e-12)]  # warm-up to 1e-3, cosine to 0 at step 2


# --- the stage -------------------------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch, repo_root):
    params = committed_params()
    params["base"].update(profile="sample", device="cpu")
    params.update(json.loads(json.dumps(SECTION)))
    params["generate"]["off_distribution_prompts"] = ["a cat", "a red sports car"]  # the grid's extra rows
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_dataset(tmp_path / S.DATASET_DIR)
    make_standin("sd_base", tmp_path / "data/models/sd_base")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path, params


def test_stage_end_to_end(workdir):
    root, params = workdir
    summary = S.main([])
    model = root / S.OUTPUT_DIR
    assert (model / "config.json").is_file() and (model / "diffusion_pytorch_model.safetensors").is_file()
    assert (model / "README.md").is_file() and "STAND-IN" in (model / "README.md").read_text()
    manifest = read_json(model / "facecontrol_model.json")
    assert manifest["name"] == "controlnet" and manifest["standin"] is True
    assert sorted(p.name for p in (root / S.CHECKPOINTS_DIR).iterdir()) == ["checkpoint-2", "checkpoint-4"]
    logs = root / S.LOG_DIR
    assert [r[0] for r in L.read_tsv(logs / "plots/metrics/train/loss.tsv")] == [1, 2, 3, 4]
    assert [v for _, v in L.read_tsv(logs / "plots/metrics/train/lr.tsv")] == [1e-4] * 4
    assert read_json(logs / "metrics.json")["step"] == 4
    assert sorted(p.name for p in (logs / "plots/images/validation").iterdir()) == ["latest.png", "step-2.png", "step-4.png"]
    # rows: the 2 validation conditions with their captions, then the 2 extra prompts on the first condition
    grid = np.asarray(Image.open(logs / "plots/images/validation/latest.png"))
    assert grid.shape == (4 * RES, 2 * RES, 3)
    top = RES // 3  # above the prompt written at the bottom of an extra row's condition
    assert np.array_equal(grid[2 * RES:2 * RES + top, :RES], grid[:top, :RES])  # the same condition...
    assert not np.array_equal(grid[3 * RES - top:3 * RES, :RES], grid[RES - top:RES, :RES])  # ...labelled
    assert not np.array_equal(grid[2 * RES:3 * RES, RES:], grid[:RES, RES:])  # ...and seed, another prompt
    saved = read_json(S.SUMMARY_FILE)
    assert saved["global_step"] == summary["global_step"] == 4 and saved["uses_standin_models"] is True
    details = read_json(provenance_path(S.SUMMARY_FILE))  # the run's numbers above; params, models... here
    assert saved["steps_per_second"] > 0 and details["params"]["learning_rate"] == 1e-4
    assert details["models"]["sd_base"]["standin"] is True and details["resumed_from"] is None
    assert assert_readable_metrics(S.SUMMARY_FILE)["finished"] is True
    assert saved["train_rows"] == 4 and saved["epochs"] == pytest.approx(4 * 2 / 4)  # 4 steps x batch 2

    # rerun after it finished: resumes at step 4, trains nothing, saves the same model again
    before = weights(model)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    again = S.main([])
    assert again["steps_this_run"] == 0 and again["resumed_from"].endswith("checkpoint-4")
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_stage_reads_the_columns_from_params(workdir):
    """train_controlnet.caption_column (etc.) reaches the loop: a column the dataset lacks stops the stage with one
    line naming the key's argument, before any model is written."""
    root, _ = workdir
    set_param(workdir, "train_controlnet.caption_column", "caption")
    with pytest.raises(PipelineError, match=r"has no column 'caption' \(caption_column\)"):
        S.main([])
    assert not (root / S.OUTPUT_DIR).exists()


def test_params_profiles_and_errors(workdir):
    _, params = workdir
    base, sample = load(S.TrainControlNetConfig, "train_controlnet", params, "sample")
    assert sample.resolution == 64 and sample.max_train_steps == 4 and sample.mixed_precision == "fp32"
    # the real profile trains in fp16, refused on a CPU-only machine: base.device left out (its check is below)
    no_device = {**params, "base": {k: v for k, v in params["base"].items() if k != "device"}}
    _, real = load(S.TrainControlNetConfig, "train_controlnet", no_device, "real")
    assert (real.resolution, real.learning_rate, real.train_batch_size, real.max_train_steps) == (512, 1e-5, 4, 25000)
    assert real.checkpointing_steps == real.validation_steps == 5000
    assert real.settings(base.seed).seed == base.seed and real.settings(0).lr_scheduler == "constant"

    def bad(**kw):
        p = json.loads(json.dumps(params))
        p["train_controlnet"].update(kw)
        return load(S.TrainControlNetConfig, "train_controlnet", p, "sample")

    with pytest.raises(ParamError, match=r"train_controlnet\.learning_rate: must be > 0"):
        bad(learning_rate=0)
    with pytest.raises(ParamError, match=r"train_controlnet\.mixed_precision: 'fp8' is not one of"):
        bad(mixed_precision="fp8")
    with pytest.raises(ParamError, match=r"train_controlnet\.proportion_empty_prompts"):
        bad(proportion_empty_prompts=1.5)
    with pytest.raises(ParamError, match=r"train_controlnet: unknown key\(s\) lr"):
        bad(lr=1)
    with pytest.raises(ParamError, match=r"train_controlnet\.checkpoints_total_limit"):
        bad(checkpoints_total_limit=0)
    with pytest.raises(ParamError, match=r"train_controlnet\.resolution: must be a multiple of 8"):
        bad(resolution=60)


def test_fp16_on_the_cpu_is_refused_before_training(workdir):
    root, _ = workdir
    set_param(workdir, "train_controlnet.mixed_precision", "fp16")
    with pytest.raises(ParamError, match=r"train_controlnet\.mixed_precision: fp16 needs a GPU"):
        S.main([])
    assert not (root / S.CHECKPOINTS_DIR).exists()


@pytest.fixture
def captured(workdir, monkeypatch):
    """The stage up to the training call: the keyword arguments it trains with (or None when refused)."""
    seen = {}

    def fake(*args, **kw):
        seen.update(kw)
        return {"finished": False}

    monkeypatch.setattr(S, "train_controlnet", fake)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return seen


def set_param(workdir, key: str, value) -> None:
    """Set ``section.key`` in the work folder's params.yaml (and in the fixture's dict)."""
    root, params = workdir
    section, name = key.split(".")
    params[section][name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def set_device(workdir, device):
    set_param(workdir, "base.device", device)


def fake_gpus(monkeypatch, n):
    """Pretend torch sees ``n`` CUDA devices; returns the list torch.cuda.set_device calls land in."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


def test_the_loop_trains_on_the_device_asked_for(workdir, captured, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device in ("cpu", "auto"):  # auto without a GPU: the CPU, and accelerate is told so
        set_device(workdir, device)
        fake_gpus(monkeypatch, 0)
        S.main([])
        assert captured.pop("cpu") is True
    set_device(workdir, "cuda:1")  # one process: cuda:1 becomes the current GPU, accelerate's "cuda"
    calls = fake_gpus(monkeypatch, 2)
    S.main([])
    assert captured.pop("cpu") is False and calls == [torch.device("cuda", 1)]
    set_device(workdir, "auto")  # auto with a GPU: accelerate's device, no GPU picked here
    calls = fake_gpus(monkeypatch, 2)
    S.main([])
    assert captured.pop("cpu") is False and calls == []


@pytest.mark.parametrize("device, gpus, world, message", [
    ("tpu", 0, 1, r"base\.device: device 'tpu' is not one of"),
    ("cuda:7", 0, 1, r"base\.device: device 'cuda:7' was asked for but torch sees no CUDA"),
    ("cuda:7", 1, 1, r"base\.device: device 'cuda:7' was asked for but torch sees 1 CUDA device"),
    ("mps", 0, 1, r"base\.device: 'mps' is mps here; train_controlnet trains on cpu or cuda"),
    ("cuda:1", 2, 2, r"base\.device: 'cuda:1' names one GPU, but train_controlnet was launched as several"),
])
def test_a_device_the_loop_cannot_use_is_refused_first(workdir, captured, monkeypatch, device, gpus, world, message):
    root, _ = workdir
    set_device(workdir, device)
    calls = fake_gpus(monkeypatch, gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: device == "mps")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ParamError, match=message):
        S.main([])
    assert captured == {} and calls == [] and not (root / S.CHECKPOINTS_DIR).exists()
