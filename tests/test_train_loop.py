"""The generic training loop on a toy task (a linear model on random rows, a loss of two parts): exact resume,
per-part logs, checkpoints that hold the model, the non-finite guard; and the data helpers (columns, captions)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.reports import read_json
from pipelines.training import data as D
from pipelines.training import loop as L

N_ROWS = 5
L1_WEIGHT = 0.1


class LinearTask:
    """y = x W + b fitted to a fixed linear target; the target gets noise from the micro-step's generator, so
    a run that mixed up generators or rows would not resume exactly."""

    name = "train_toy"
    model_name = "linear"
    diverged_hint = "lower the toy's learning rate"

    def __init__(self, loss_scale: float = 1.0):
        g = torch.Generator().manual_seed(123)
        x = torch.randn(N_ROWS, 3, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.25
        self.rows = [{"x": x[i], "y": y[i]} for i in range(N_ROWS)]
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)
        self.frozen = (torch.nn.Linear(3, 3),)  # a fixed input projection, never trained
        self.loss_scale = loss_scale

    def recipe(self) -> dict:
        return {"l1_weight": L1_WEIGHT}

    def data_identity(self) -> str:
        return "toy-rows-123"

    def loss(self, model, batch, generator):
        target = batch["y"] + 0.01 * torch.randn(batch["y"].shape, generator=generator)
        pred = model(self.frozen[0](batch["x"]))
        mse, l1 = F.mse_loss(pred, target), (pred - target).abs().mean()
        return self.loss_scale * (mse + L1_WEIGHT * l1), {"mse": mse, "l1": l1}

    def validate(self, step):
        return Image.new("RGB", (4, 4), (step, 0, 0))

    def save(self, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(self.model.state_dict(), str(out_dir / "model.safetensors"))

    def write_card(self, out_dir: Path, steps: int, metrics: dict) -> None:
        (out_dir / "README.md").write_text(f"toy, {steps} steps, final loss {metrics['final_loss']:.6g}\n")


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # accelerate's global state reset around each test


def settings(**kw) -> L.LoopSettings:
    base = dict(learning_rate=0.05, train_batch_size=2, gradient_accumulation_steps=2, max_train_steps=6,
                checkpointing_steps=1, checkpoints_total_limit=2, validation_steps=3, seed=0)
    return L.LoopSettings(**{**base, **kw})


def run(root: Path, s: L.LoopSettings, task=None, **kw) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return L.run_training(task or LinearTask(), s, root / "out", root / "ckpt", root / "logs", cpu=True, **kw)


def saved(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_a_resumed_toy_run_equals_an_uninterrupted_one(tmp_path):
    a = run(tmp_path / "a", settings())
    assert a["finished"] and a["global_step"] == 6 and a["resumed_from"] is None
    assert [step for step, _ in L.list_checkpoints(tmp_path / "a/ckpt")] == [5, 6]

    sb = settings(checkpointing_steps=2)  # not part of the recipe: the resume does not depend on it
    first = run(tmp_path / "b", sb, stop_after=5)  # interrupted after step 5: the newest checkpoint is 4
    assert not first["finished"] and not (tmp_path / "b/out").exists()
    b = run(tmp_path / "b", sb)
    assert b["resumed_from"].endswith("checkpoint-4") and b["steps_this_run"] == 2 and b["finished"]

    wa, wb = saved(tmp_path / "a/out"), saved(tmp_path / "b/out")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for name in ("loss", "mse", "l1", "lr"):
        la, lb = (L.read_tsv(tmp_path / f"{x}/logs/plots/metrics/train/{name}.tsv") for x in "ab")
        assert la == lb, name  # step 5 of the interrupted run was dropped and redone, to the same value
    assert a["epochs"] == pytest.approx(6 * 2 * 2 / N_ROWS) and a["train_rows"] == N_ROWS
    assert (a["linear_dtype"], a["frozen_dtype"]) == ("float32", "float32")
    assert "6 steps" in (tmp_path / "a/out/README.md").read_text()


def test_every_loss_part_is_logged(tmp_path):
    summary = run(tmp_path, settings(lr_scheduler="linear", lr_warmup_steps=0))
    metrics = tmp_path / "logs/plots/metrics/train"
    assert sorted(p.name for p in metrics.iterdir()) == ["l1.tsv", "loss.tsv", "lr.tsv", "mse.tsv"]
    loss, mse, l1 = (L.read_tsv(metrics / f"{n}.tsv") for n in ("loss", "mse", "l1"))
    assert [step for step, _ in loss] == [step for step, _ in mse] == [step for step, _ in l1] == [1, 2, 3, 4, 5, 6]
    # the loss is the sum of its parts, step by step (each value is the mean over the accumulated micro-steps)
    np.testing.assert_allclose([v for _, v in loss], [m + L1_WEIGHT * a for (_, m), (_, a) in zip(mse, l1, strict=True)],
                               rtol=1e-6)
    assert loss[-1][1] < loss[0][1]  # it learns
    lrs = [v for _, v in L.read_tsv(metrics / "lr.tsv")]
    np.testing.assert_allclose(lrs, [0.05 * (6 - k) / 6 for k in range(1, 7)], atol=1e-12)  # linear decay to 0
    saved_metrics = read_json(tmp_path / "logs/metrics.json")
    assert saved_metrics["step"] == 6 and sorted(saved_metrics["train"]) == ["l1", "loss", "lr", "mse"]
    assert summary["final_loss"] == pytest.approx(loss[-1][1], rel=1e-6)
    images = tmp_path / "logs/plots/images/validation"
    assert sorted(p.name for p in images.iterdir()) == ["latest.png", "step-3.png", "step-6.png"]
    assert Image.open(images / "latest.png").getpixel((0, 0)) == (6, 0, 0)


def test_checkpoints_hold_the_model_at_their_step(tmp_path):
    at = {}
    run(tmp_path, settings(max_train_steps=3, checkpoints_total_limit=None),
        on_step=lambda step, model: at.__setitem__(step, {k: v.clone() for k, v in model.state_dict().items()}))
    for step in (1, 2, 3):
        ckpt = tmp_path / f"ckpt/checkpoint-{step}"
        w = saved(ckpt / "linear")
        assert all(torch.equal(w[k], at[step][k]) for k in at[step]), step
        assert (ckpt / "model.safetensors").is_file() and (ckpt / L.STEP_FILE).is_file()  # accelerate's state too
    assert not torch.equal(at[1]["weight"], at[3]["weight"])


def test_a_non_finite_loss_stops_the_toy_and_names_the_task(tmp_path):
    with pytest.raises(L.NonFiniteTraining, match=r"^train_toy: the loss is inf at step 1; no model was written: "
                                                  r"lower the toy's learning rate$"):
        run(tmp_path, settings(), task=LinearTask(loss_scale=float("inf")))
    assert not (tmp_path / "out").exists() and L.list_checkpoints(tmp_path / "ckpt") == []


# --- data helpers -----------------------------------------------------------------------------------------


def test_a_missing_column_is_one_line_naming_it():
    D.check_columns(["image", "text"], {"image_column": "image", "caption_column": "text"}, "ds")
    with pytest.raises(D.MissingColumn) as err:
        D.check_columns(["image", "text"], {"image_column": "image", "caption_column": "caption"}, "ds (split train)")
    assert str(err.value) == "ds (split train) has no column 'caption' (caption_column); its columns: image, text"


def test_caption_choice():
    ids = torch.arange(6).reshape(2, 3)
    assert D.pick_captions(ids, torch.Generator()) is ids  # a string column: one row per sample, no draw
    options = [torch.tensor([[0, 0], [1, 1], [2, 2]]), torch.tensor([[7, 7]])]
    picks = [D.pick_captions(options, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(p.shape == (2, 2) for p in picks)
    assert {int(p[0, 0]) for p in picks} == {0, 1, 2} and all(int(p[1, 0]) == 7 for p in picks)
    assert torch.equal(D.pick_captions(options, torch.Generator().manual_seed(3)), picks[3])  # seeded
    assert D.caption_options("a face") == ["a face"] and D.first_caption(["a", "b"]) == "a"
    with pytest.raises(ValueError, match="empty list"):
        D.caption_options([])


def test_collate_stacks_equal_shapes_and_lists_the_rest():
    batch = L.collate([{"a": torch.zeros(2), "b": torch.zeros(1, 3)}, {"a": torch.ones(2), "b": torch.zeros(2, 3)}])
    assert batch["a"].shape == (2, 2) and [t.shape[0] for t in batch["b"]] == [1, 2]
