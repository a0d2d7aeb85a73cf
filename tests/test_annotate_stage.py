"""Stage annotate end to end on a tiny fixture: shards, summary, failure reasons, kill -9 resume, invalidation
(by settings and by a changed raw file)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import committed_params

from pipelines.faces.spiga import WEIGHTS_FILE
from pipelines.reports import ModelInfo, provenance_path, read_json, write_model_manifest
from pipelines.shards import SUMMARY, read_shards
from pipelines.sources.facesynthetics import BOX_OFF_IMAGE
from pipelines.standins.spiga import build_spiga_standin
from stages import annotate
from stages.config import ParamError

REPO = Path(__file__).resolve().parents[1]
NUM_FACES, NUM_BROKEN = 3, 4
OFF_ID = f"{NUM_FACES + NUM_BROKEN:06d}"  # one extra face whose landmarks lie mostly off the image


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    """Raw sample + stand-in model, built once and linked into each project dir."""
    import hashlib

    from pipelines.sources.sample_faces import write_sample

    root = tmp_path_factory.mktemp("shared")
    raw = root / "raw"
    source = write_sample(raw, num_faces=NUM_FACES, num_broken=NUM_BROKEN, seed=0, size=512)
    # a face shifted 400 px right: its box is mostly off the image
    pts = np.loadtxt(raw / "000000_ldmks.txt") + [400.0, 0.0]
    (raw / f"{OFF_ID}.png").write_bytes((raw / "000000.png").read_bytes())
    (raw / f"{OFF_ID}_ldmks.txt").write_text("".join(f"{x} {y}\n" for x, y in pts))
    models = root / "spiga"
    weights = build_spiga_standin(models / WEIGHTS_FILE, seed=0)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    write_model_manifest(models, ModelInfo(name="spiga", id=WEIGHTS_FILE, revision=sha, source="built by code", standin=True))
    return {"raw": raw, "models": models, "broken": source["broken"]}


def make_project(path: Path, shared: dict, **annotate_sample) -> Path:
    """A project dir: data/raw + data/models linked to the shared fixture, params.yaml from the repo's."""
    (path / "data" / "raw").mkdir(parents=True)
    (path / "data" / "models").mkdir(parents=True)
    (path / "data" / "raw" / "facesynthetics").symlink_to(shared["raw"])
    (path / "data" / "models" / "spiga").symlink_to(shared["models"])
    params = committed_params()
    params["base"].update(device="cpu", profile="sample")
    params["annotate"].update({"batch_size": 2, "num_workers": 0, "shard_size": 2, **annotate_sample})
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    return path


def out_dir(project: Path) -> Path:
    return project / annotate.OUT_DIR


@pytest.fixture(scope="module")
def done(tmp_path_factory, shared) -> Path:
    """One uninterrupted in-process run (the reference for the resume test)."""
    project = make_project(tmp_path_factory.mktemp("done"), shared)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        annotate.main([])
    finally:
        os.chdir(cwd)
    return project


def test_shards_and_summary(done, shared):
    table = read_shards(out_dir(done))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert len(rows) == NUM_FACES + NUM_BROKEN + 1
    good = [f"{i:06d}" for i in range(NUM_FACES)]
    for sid in good:
        r = rows[sid]
        assert r["ok"] and r["error"] is None
        ldm = np.array(r["landmarks"])
        assert ldm.shape == (68, 2) and np.isfinite(ldm).all()
        assert len(r["headpose"]) == 6 and np.isfinite(r["headpose"]).all()
        src = np.array(r["source_landmarks"])
        assert src.shape == (70, 2)
        x, y, w, h = r["face_box"]  # the original rule: min/max of the 70 points grown by 5 px
        np.testing.assert_allclose([x, y, x + w, y + h], [*(src.min(0) - 5), *(src.max(0) + 5)], atol=1e-3)
    for sid, reason in shared["broken"].items():
        assert not rows[sid]["ok"] and rows[sid]["error"] == reason and rows[sid]["landmarks"] is None
    assert rows[OFF_ID]["error"] == BOX_OFF_IMAGE

    summary = read_json(out_dir(done) / SUMMARY)
    expected_failed = {}
    for reason in [*shared["broken"].values(), BOX_OFF_IMAGE]:
        expected_failed[reason] = expected_failed.get(reason, 0) + 1
    assert summary["counts"] == {"rows": 8, "ok": NUM_FACES, "failed": 5, "failed_by_reason": expected_failed}
    assert summary["model"]["standin"] is True and summary["uses_standin_models"] is True
    assert summary["model"]["id"] == WEIGHTS_FILE
    assert summary["runtime"]["device"] == "cpu" and summary["runtime"]["precision"] == "fp32"
    assert set(summary) == {"model", "uses_standin_models", "runtime", "config", "counts"}  # data: no timings
    run = read_json(done / annotate.RUN_REPORT)  # this run's figures: a metrics file, beside its provenance
    assert run["this_run"] == {"items_processed": 8, "shards_reused": 0, "num_shards": 4, "failed": 5}
    assert run["throughput"]["items_per_second"] > 0 and run["throughput"]["items"] == 8
    assert run["uses_standin_models"] is True
    details = read_json(provenance_path(done / annotate.RUN_REPORT))
    assert details["model"]["id"] == WEIGHTS_FILE and details["throughput_scope"] == "all processes"
    assert details["failures_this_run"] == expected_failed


def test_rerun_reuses_all_shards(tmp_path, shared, done, monkeypatch):
    project = make_project(tmp_path / "p", shared)
    monkeypatch.chdir(project)
    out = out_dir(project)
    out.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(out_dir(done), out)
    summary = annotate.main([])
    assert summary["this_run"] == {**summary["this_run"], "items_processed": 0, "shards_reused": 4}
    assert (out / SUMMARY).read_bytes() == (out_dir(done) / SUMMARY).read_bytes()  # data: the same bytes
    shutil.copy(done / annotate.RUN_REPORT, annotate.RUN_REPORT)  # the previous run's report (dvc persist)
    summary = annotate.main([])
    assert summary["throughput"] == read_json(done / annotate.RUN_REPORT)["throughput"]  # carried, not lost
    assert read_json(annotate.RUN_REPORT)["throughput"] == summary["throughput"]
    assert read_shards(out).equals(read_shards(out_dir(done)))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path, shared, done):
    project = make_project(tmp_path / "p", shared)
    out = out_dir(project)
    proc = subprocess.Popen([sys.executable, "-m", "stages.annotate"], cwd=project, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out / "shard-00000.parquet").is_file():
        if proc.poll() is not None:
            pytest.fail(f"stage ended before its first shard: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "no shard within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    kept = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert "shard-00000.parquet" in kept
    assert not (out / SUMMARY).exists() or len(kept) == 4  # killed before the end (almost surely)

    subprocess.run([sys.executable, "-m", "stages.annotate"], cwd=project, env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert read_shards(out).equals(read_shards(out_dir(done)))
    summary = read_json(out / SUMMARY)
    assert read_json(project / annotate.RUN_REPORT)["this_run"]["shards_reused"] == len(kept)
    assert summary["counts"] == read_json(out_dir(done) / SUMMARY)["counts"]
    assert not list(out.glob(".tmp-*"))


def test_changed_config_discards_old_shards(tmp_path, shared, done, monkeypatch):
    import shutil

    project = make_project(tmp_path / "p", shared, box_margin=20)
    out = out_dir(project)
    out.parent.mkdir(parents=True)
    shutil.copytree(out_dir(done), out)
    monkeypatch.chdir(project)
    summary = annotate.main([])
    assert summary["this_run"]["shards_reused"] == 0 and summary["this_run"]["items_processed"] == 8
    rows = {r["id"]: r for r in read_shards(out).to_pylist()}
    src = np.array(rows["000000"]["source_landmarks"])
    x, y, w, h = rows["000000"]["face_box"]
    np.testing.assert_allclose([x, y], src.min(0) - 20, atol=1e-3)


def test_replaced_raw_image_is_annotated_again(tmp_path, shared, done, monkeypatch):
    """A raw file replaced after a run (same name, other bytes) remakes its shard, and only that one."""
    import shutil

    project = make_project(tmp_path / "p", shared)
    raw = project / annotate.RAW_DIR
    raw.unlink()
    shutil.copytree(shared["raw"], raw)  # a private copy: this test changes it
    (raw / "000001.png").write_bytes((raw / "000002.png").read_bytes())
    out = out_dir(project)
    out.parent.mkdir(parents=True)
    shutil.copytree(out_dir(done), out)
    monkeypatch.chdir(project)
    summary = annotate.main([])
    assert summary["this_run"]["items_processed"] == 2 and summary["this_run"]["shards_reused"] == 3  # shard 0
    before = {r["id"]: r for r in read_shards(out_dir(done)).to_pylist()}
    after = {r["id"]: r for r in read_shards(out).to_pylist()}
    assert after["000001"]["ok"] and after["000001"]["landmarks"] != before["000001"]["landmarks"]
    assert {i: r for i, r in after.items() if i != "000001"} == {i: r for i, r in before.items() if i != "000001"}


def test_bad_precision_names_the_key(tmp_path, shared, monkeypatch):
    project = make_project(tmp_path / "p", shared)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["annotate"]["precision"] = "fp8"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project)
    with pytest.raises(ParamError, match=r"annotate\.precision"):
        annotate.main([])
    assert not out_dir(project).exists()


@pytest.mark.parametrize("key,value", [("batch_size", 0), ("shard_size", -1), ("num_workers", -1), ("min_box_inside", 1.5)])
def test_bad_values_name_the_key(tmp_path, shared, monkeypatch, key, value):
    project = make_project(tmp_path / "p", shared, **{key: value})
    monkeypatch.chdir(project)
    with pytest.raises(ParamError, match=rf"annotate\.{key}"):
        annotate.main([])


def test_help_runs():
    res = subprocess.run([sys.executable, "-m", "stages.annotate", "--help"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "params" in res.stdout
