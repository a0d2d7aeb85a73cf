"""The prepared GPU check, checked before a GPU exists: the budget runner (cut, out of memory, crash, skip), the
real-size configs (parameter counts on the meta device), the wheel list, the summary, and ``make gpu-check`` itself
in its CPU mode (tiny stand-ins, the 60 s budget), asserting on the files it writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, committed_params, write_committed_params

from pipelines.gpucheck import measure
from pipelines.gpucheck.runner import STATUSES, Measurement, SkipMeasurement, run_measurements
from pipelines.gpucheck.wheels import CARRIED, pinned
from pipelines.standins import real_size as R
from stages import config as C
from stages import gpu_check

# --- measurement functions the runner's worker imports (by this module's name) ----------------------------------


def put_value(probe, value):
    probe.put("value", value)
    probe.put("time_left_positive", probe.time_left() > 0)


def put_start_method(probe):
    import multiprocessing

    probe.put("start_method", multiprocessing.get_start_method())


def overrun(probe, pid_file=None):
    probe.put("before", 1)
    if pid_file:  # a child of the measurement (as the training matrix starts): the cut must end it too
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        Path(pid_file).write_text(str(child.pid))
    time.sleep(120)


def out_of_memory(probe):
    probe.put("before", 2)
    raise RuntimeError("CUDA out of memory. Tried to allocate 80.00 GiB")


def fails(probe):
    raise ValueError("bad option")


def crash(probe):
    os._exit(3)


def needs_earlier(probe):
    raise SkipMeasurement("the annotate measurement did not finish")


def _target(fn) -> str:
    return f"{__name__}:{fn.__name__}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split()[2] != "Z"


# --- the runner ------------------------------------------------------------------------------------------------


def test_runner_records_every_outcome_and_goes_on(tmp_path):
    pid_file = tmp_path / "child.pid"
    plan = [
        Measurement("first", _target(put_value), 30, {"value": 7}),
        Measurement("overrun", _target(overrun), 3, {"pid_file": str(pid_file)}),
        Measurement("oom", _target(out_of_memory), 30),
        Measurement("error", _target(fails), 30),
        Measurement("crash", _target(crash), 30),
        Measurement("needs", _target(needs_earlier), 30),
        Measurement("after", _target(put_value), 30, {"value": 8}),
    ]
    seen = []
    records, info = run_measurements(plan, 120, on_record=lambda r, i: seen.append(r["name"]))
    by = {r["name"]: r for r in records}
    assert seen == [m.name for m in plan] and info == {}
    assert by["first"]["status"] == "ok" and by["first"]["results"] == {"value": 7, "time_left_positive": True}
    cut = by["overrun"]
    assert cut["status"] == "cut" and cut["results"] == {"before": 1} and "cap of 3 s" in cut["error"]
    assert 3 <= cut["seconds"] < 15
    assert not _alive(int(pid_file.read_text())), "the cut measurement's child process outlived it"
    assert by["oom"]["status"] == "out_of_memory" and by["oom"]["results"] == {"before": 2}
    assert by["error"]["status"] == "error" and "ValueError: bad option" in by["error"]["error"]
    assert by["crash"]["status"] == "crashed" and "exit code 3" in by["crash"]["error"]
    assert by["needs"]["status"] == "skipped" and "did not finish" in by["needs"]["error"]
    assert by["after"]["status"] == "ok" and by["after"]["results"]["value"] == 8
    assert {r["status"] for r in records} <= set(STATUSES)


def test_worker_starts_processes_as_a_stage_would():
    """DataLoader workers in a measurement start the way they do in a stage run from the shell (a spawned
    process's own default is spawn: every decode worker would then import torch afresh)."""
    import multiprocessing

    (record,), _ = run_measurements([Measurement("m", _target(put_start_method), 60)], 60)
    assert record["results"] == {"start_method": multiprocessing.get_start_method()}


def test_runner_cuts_at_the_budget_and_skips_the_rest():
    plan = [Measurement("long", _target(overrun), 100), Measurement("never", _target(put_value), 100, {"value": 1})]
    start = time.monotonic()
    records, _ = run_measurements(plan, 4)
    assert time.monotonic() - start < 20
    long, never = records
    assert long["status"] == "cut" and long["cap_s"] <= 4 and long["results"] == {"before": 1}
    assert never["status"] == "skipped" and "budget of 4 s" in never["error"] and never["results"] == {}


# --- pieces with known answers -------------------------------------------------------------------------------


def test_real_size_configs_have_the_released_parameter_counts():
    from pipelines.standins.tokenizers import build_clip_tokenizer, load_clip_tokenizer

    with torch.device("meta"):
        unet = R.sd_unet()
        counts = {"unet": R.count_parameters(unet), "vae": R.count_parameters(R.sd_vae()),
                  "text_encoder": R.count_parameters(R.sd_text_encoder())}
        tokenizer = load_clip_tokenizer(build_clip_tokenizer(Path(os.environ.get("TMPDIR", "/tmp")) / "gc-cliptok"))
        counts["clip"] = R.count_parameters(R.clip_l14(tokenizer))
        controlnet = R.controlnet_from(unet)
        blip = R.blip_large(R.blip_tokenizer())
    assert counts == R.PARAMETER_COUNTS
    # the ControlNet copies the UNet's encoder half: its down blocks have the UNet's parameters exactly
    assert R.count_parameters(controlnet.down_blocks) == R.count_parameters(unet.down_blocks)
    assert blip.config.vision_config.hidden_size == 1024 and blip.config.text_config.vocab_size == len(R.blip_tokenizer())


def test_pinned_wheels_are_the_lock_entries_for_python_312():
    lock = (REPO_ROOT / "requirements.lock").read_text()
    lines = pinned(lock)
    assert [line.split("==")[0].lower() for line in lines] == [n.lower() for n in CARRIED]
    assert all("--hash=sha256:" in line for line in lines)
    versions = dict(line.split(" ")[0].split("==") for line in lines)
    # the lock pins diffusers twice (by python version); 3.12 takes the >= 3.11 entry
    assert versions["diffusers"] == "0.42.1"
    with pytest.raises(ValueError, match="pins no not-a-package"):
        pinned(lock, ("diffusers", "not-a-package"))


def test_landmark_drift_known_answer():
    ref = {"a": np.zeros((68, 2)), "b": np.zeros((68, 2))}
    other = {"a": np.zeros((68, 2)), "c": np.ones((68, 2))}
    other["a"][0] = [3.0, 4.0]  # one landmark 5 px off
    drift = measure.landmark_drift(ref, other)
    assert drift["faces"] == 1 and drift["max"] == 5.0 and drift["mean"] == pytest.approx(5 / 68)
    assert measure.landmark_drift(ref, {"z": np.zeros((68, 2))}) is None


def test_summary_projects_100k_faces_from_the_measured_rates():
    records = [
        {"name": "annotate", "status": "ok", "results": {"ours.fp32": {"images_per_s": 100.0, "wait_fraction": 0.1},
                                                         "original.fp32": {"images_per_s": 10.0}}},
        {"name": "caption", "status": "ok", "results": {"precision": "fp16", "ours": {"images_per_s": 50.0,
                                                                                      "wait_fraction": 0.0},
                                                        "original": {"images_per_s": 5.0}}},
        {"name": "assemble", "status": "ok", "results": {"ours": {"images_per_s": 200.0}}},
        {"name": "train", "status": "cut", "results": {}},
    ]
    s = gpu_check.summarize(records, "fp32", "cuda")
    p = s["projection_100k"]
    assert p["seconds"] == {"annotate": 1000.0, "caption": 2000.0, "assemble": 500.0}
    assert p["total_seconds"] == 3500.0 and p["total_minutes"] == pytest.approx(3500 / 60)
    spiga = next(r for r in s["table"] if r["path"] == "SPIGA annotate fp32")
    assert spiga["ratio"] == 10.0
    assert s["status"]["train"] == "cut"
    missing = gpu_check.summarize(records[:1], "fp32", "cuda")["projection_100k"]
    assert missing["missing"] == ["assemble", "caption"] and "total_seconds" not in missing


def test_every_measurement_has_a_cap_in_both_profiles(one_gpu):
    params = committed_params()
    for profile in C.PROFILES:
        _, cfg = C.load(gpu_check.GpuCheckConfig, "gpu_check", params, profile)
        assert set(cfg.caps_s) == set(measure.MEASUREMENTS)
    params["gpu_check"]["caps_s"].pop("train")
    with pytest.raises(C.ParamError, match=r"gpu_check.caps_s: .*missing: \['train'\]"):
        C.load(gpu_check.GpuCheckConfig, "gpu_check", params, "sample")


def test_real_profile_times_the_real_sizes_within_8_minutes(one_gpu):
    _, cfg = C.load(gpu_check.GpuCheckConfig, "gpu_check", committed_params(), "real")
    assert cfg.sizes == "real" and cfg.budget_s == 480
    assert cfg.sample.resolution == 512 and cfg.train.resolution == 512
    assert cfg.annotate_batch_size == committed_params()["annotate"]["batch_size"]["real"]
    steps = [m.name for m in gpu_check.plan(cfg, "cuda", 0, "/tmp/x")]
    assert steps == list(measure.MEASUREMENTS)


# --- make gpu-check in its CPU mode -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """``make gpu-check`` with the sample profile (tiny stand-ins, 60 s budget) after a first call that builds
    the models (a rerun reuses them, as on a GPU machine)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    params = write_committed_params(tmp / "params.yaml")
    work, out = tmp / "work", tmp / "out"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    common = f"--params {params} --profile sample --work-dir {work}"
    build = subprocess.run(["make", "-s", "gpu-check", f"ARGS={common} --out {tmp / 'build'} --only build_models"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    start = time.monotonic()
    run = subprocess.run(["make", "-s", "gpu-check", f"ARGS={common} --out {out}"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    return run, out, time.monotonic() - start


def test_cpu_mode_writes_one_json_per_measurement_and_a_summary(cpu_check):
    run, out, wall = cpu_check
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    budget = committed_params()["gpu_check"]["budget_s"]["sample"]
    assert budget == 60
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_seconds"] <= budget + 15  # the budget, plus a cut measurement's clean-up
    assert set(summary["status"]) == set(measure.MEASUREMENTS)
    for name in measure.MEASUREMENTS:
        record = json.loads((out / f"{name}.json").read_text())
        assert record["name"] == name and record["status"] in STATUSES and record["sizes"] == "tiny"
        assert record["budget_s"] == budget and record["settings"]["work_dir"]
        for key in ("device_name", "driver", "torch", "cuda", "packages"):
            assert key in record["environment"]
    records = {n: json.loads((out / f"{n}.json").read_text()) for n in measure.MEASUREMENTS}
    assert records["build_models"]["results"] == {"reused": True}
    assert records["data_path"]["status"] == "ok"
    assert records["data_path"]["results"]["decode_images_per_s.workers_0"] > 0
    # what each measurement puts when it completes (on a loaded machine a late one may be cut or skipped instead)
    expected = {"annotate": ["ours.fp32", "original.fp32"], "caption": ["ours", "original"],
                "assemble": ["ours", "draw_only"], "sample": ["settings", "ours", "original"],
                "train": ["configs.fp32", "ratios"], "features": ["inception", "clip"]}
    # nothing failed: a measurement is done, or cut at its cap / skipped at the budget (a loaded machine)
    assert {r["status"] for r in records.values()} <= {"ok", "cut", "skipped"}, summary["status"]
    done = [n for n in expected if records[n]["status"] == "ok"]
    assert len(done) >= 2, summary["status"]
    for name in done:
        assert set(expected[name]) <= set(records[name]["results"]), name
    for name in expected:
        if records[name]["status"] == "cut":
            assert "cap of" in records[name]["error"]
    if "annotate" in done:
        ours = records["annotate"]["results"]["ours.fp32"]
        assert ours["images_per_s"] > 0 and 0 <= ours["wait_fraction"] <= 1 and ours["failures"] == {}
        assert "SPIGA annotate fp32" in run.stdout
    assert "GPU check on" in run.stdout
    if records["assemble"]["status"] == "ok":
        assert summary["projection_100k"]["total_minutes"] > 0
        assert "100,000 faces annotate" in run.stdout


def test_gpu_check_refuses_a_python_without_diffusers_and_without_wheels(tmp_path):
    """On a bare machine without the wheels folder, the one-line reason and exit code 2, before anything runs."""
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    run = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={fake}", f"GPU_WHEELS={tmp_path / 'none'}"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "has no diffusers" in run.stdout and "make gpu-wheels" in run.stdout


def test_the_check_runs_the_real_profile_unless_told(tmp_path):
    """``make gpu-check`` on a GPU machine times the real sizes, whatever base.profile (the DAG's switch) says."""
    params = write_committed_params(tmp_path / "params.yaml")
    assert committed_params()["base"]["profile"] == "sample"
    run = subprocess.run([sys.executable, "-m", "stages.gpu_check", "--params", str(params), "--out",
                          str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--budget-s", "3",
                          "--only", "build_models"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "build_models.json").read_text())
    assert record["profile"] == "real" and record["sizes"] == "real" and record["budget_s"] == 3
    assert record["status"] in ("cut", "skipped")  # 3 s do not build SD 2.1-base
