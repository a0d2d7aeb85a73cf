"""Two processes (torchrun, CPU/gloo) split a sharded stage: every shard made once, one summary."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import committed_params, write_committed_params

from pipelines.model_store import make_standin
from pipelines.reports import provenance_path, read_json
from pipelines.shards import SUMMARY, read_shards, state_dir
from pipelines.sources.sample_faces import write_sample

pytestmark = pytest.mark.slow


def test_two_processes_split_the_shards(tmp_path: Path, repo_root: Path) -> None:
    write_sample(tmp_path / "data/raw/facesynthetics", num_faces=10, num_broken=2, seed=3)
    make_standin("blip", tmp_path / "data/models/blip")
    write_committed_params(tmp_path / "params.yaml")  # sample profile: shard_size 8
    env = {**os.environ, "PYTHONPATH": str(repo_root), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    proc = subprocess.run([*torchrun, "-m", "stages.caption"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "data/interim/facesynthetics/captions"
    table = read_shards(out)
    assert table.column("id").to_pylist() == [f"{i:06d}" for i in range(12)]  # 2 shards of 8 and 4 rows, no duplicate
    # each process recorded the inputs of the shard it made (only the main one took the output's lock)
    assert all((state_dir(out) / f"shard-{k:05d}.stats.json").is_file() for k in (0, 1))
    summary = read_json(out / SUMMARY)
    assert summary["counts"]["rows"] == 12 and summary["counts"]["ok"] == 10
    # the main process did shard 0 (8 items); process 1 did shard 1 (4 items)
    run = tmp_path / "reports/bench/caption.json"  # the run's figures: a metrics file and its provenance
    assert read_json(run)["this_run"]["items_processed"] == 8
    assert read_json(provenance_path(run))["throughput_scope"] == "main process"
    assert summary["runtime"]["num_processes"] == 2
    assert proc.stderr.count("INFO stages.caption: caption:") == 1  # the summary is written once


def test_two_processes_split_generation(tmp_path: Path, repo_root: Path) -> None:
    """generate under torchrun: each image made once by one process, the same pixels as one process makes,
    metadata and summary written once by the main process."""
    import numpy as np
    import yaml
    from PIL import Image
    from test_generation import MODEL, write_dataset

    from stages import generate as G

    params = committed_params()
    params["base"].update(profile="sample", device="cpu")
    params["generate"].update(max_images=3, batch_size=2, off_distribution_conditions=1)
    params["generate"]["off_distribution_prompts"] = ["a cat", "a red sports car", "a bowl of fruit"]
    runs = {}
    for procs in (1, 2):
        work = tmp_path / f"procs{procs}"
        work.mkdir()
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        write_dataset(work / G.DATASET_DIR)
        make_standin("sd_base", work / G.SD_DIR)
        make_standin("controlnet", work / params["controlnets"][MODEL])
        env = {**os.environ, "PYTHONPATH": str(repo_root), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", "29519"]
        proc = subprocess.run([*launch, "-m", "stages.generate", "--model", MODEL, "--controlnet", params["controlnets"][MODEL]], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr.count("INFO stages.generate: generate") == 1  # the summary is written once
        runs[procs] = work / "data/generated" / MODEL
    one, two = runs[1], runs[2]
    assert read_json(two / "summary.json")["num_processes"] == 2 and read_json(two / "summary.json")["images_made"] == 6
    for meta in ("metadata.jsonl", "off_distribution.jsonl"):
        assert (one / meta).read_text() == (two / meta).read_text()
    files = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert len(files) == 6 and files == sorted(p.relative_to(two) for p in two.rglob("*.png"))
    for f in files:
        a, b = (np.asarray(Image.open(r / f), dtype=np.int16) for r in (one, two))
        assert np.abs(a - b).max() <= 1, f
