"""Two processes (torchrun, CPU/gloo) train one ControlNet: DDP keeps the ranks' weights equal, the main
process alone logs and saves, checkpoints are made as configured, and a two-process run resumes."""
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_controlnet import write_dataset

from pipelines.model_store import make_standin
from pipelines.reports import read_json
from pipelines.training import controlnet as T
from pipelines.training import loop as L

pytestmark = pytest.mark.slow
HELPER = Path(__file__).parent / "helpers" / "train_ddp.py"
SETTINGS = dict(resolution=32, learning_rate=1e-3, train_batch_size=1, max_train_steps=4, checkpointing_steps=2,
                checkpoints_total_limit=2, validation_steps=100, num_validation_images=1, validation_inference_steps=1,
                seed=0)


def torchrun(repo_root: Path, tmp_path: Path, **settings) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(repo_root), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(HELPER), str(tmp_path / "sd"), str(tmp_path / "ds"), str(tmp_path / "run"),
           json.dumps({**SETTINGS, **settings})]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_train_and_resume(tmp_path: Path, repo_root: Path) -> None:
    from diffusers import ControlNetModel

    make_standin("sd_base", tmp_path / "sd")
    write_dataset(tmp_path / "ds")
    (tmp_path / "run").mkdir()
    run = tmp_path / "run"
    state_digest = runpy.run_path(str(HELPER))["state_digest"]
    untrained = state_digest(T.load_components(tmp_path / "sd", seed=0).controlnet)

    proc = torchrun(repo_root, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [(run / f"digest-{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1] != untrained  # DDP averaged the gradients: both ranks took the same steps
    summaries = [read_json(run / f"summary-{r}.json") for r in (0, 1)]
    for s in summaries:
        assert s["num_processes"] == 2 and s["global_step"] == 4 and s["finished"] and s["resumed_from"] is None
    assert [step for step, _ in L.read_tsv(run / "logs/plots/metrics/train/loss.tsv")] == [1, 2, 3, 4]
    assert [step for step, _ in L.list_checkpoints(run / "ckpt")] == [2, 4]
    assert sorted(p.name for p in (run / "logs/plots/images/validation").iterdir()) == ["latest.png", "step-4.png"]
    assert state_digest(ControlNetModel.from_pretrained(str(run / "out"))) == digests[0]  # the main process saved it

    # a longer run after the model was removed: both processes resume from checkpoint-4 and train 2 more steps
    shutil.rmtree(run / "out")
    proc = torchrun(repo_root, tmp_path, max_train_steps=6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        s = read_json(run / f"summary-{r}.json")
        assert s["resumed_from"].endswith("checkpoint-4") and s["steps_this_run"] == 2 and s["global_step"] == 6
    digests = [(run / f"digest-{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    assert [step for step, _ in L.read_tsv(run / "logs/plots/metrics/train/loss.tsv")] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in L.list_checkpoints(run / "ckpt")] == [4, 6]
    assert state_digest(ControlNetModel.from_pretrained(str(run / "out"))) == digests[0]


def test_two_processes_stop_together_on_a_non_finite_loss(tmp_path: Path, repo_root: Path) -> None:
    """The loss every rank checks is the reduced one: both raise at the same step (no rank left waiting in a
    collective), and nothing is saved."""
    make_standin("sd_base", tmp_path / "sd")
    write_dataset(tmp_path / "ds")
    (tmp_path / "run").mkdir()
    proc = torchrun(repo_root, tmp_path, learning_rate=1e30, checkpointing_steps=1)
    assert proc.returncode != 0
    assert proc.stderr.count("NonFiniteTraining: train_controlnet: the loss is") == 2, proc.stderr[-3000:]
    assert not (tmp_path / "run/out").exists() and [s for s, _ in L.list_checkpoints(tmp_path / "run/ckpt")] == [1]
