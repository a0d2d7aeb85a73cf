"""The training benchmark: every configuration measured in its own process, ratios to fp32, parameter errors."""
import json

import numpy as np
import pytest
import torch
import yaml
from test_train_controlnet import SECTION, write_dataset

from pipelines.model_store import make_standin
from pipelines.reports import provenance_path, read_json
from pipelines.training import bench as TB
from stages import bench_train_controlnet as B
from stages.config import ParamError, load

#: A fixed copy of the params section this stage reads (per-profile values as in params.yaml).
BENCH_SECTION = yaml.safe_load("""
bench_train_controlnet:
  gradient_checkpointing: [false, true]
  resolution: {sample: 64, real: 512}
  train_batch_size: {sample: 2, real: 4}
  warmup_steps: {sample: 1, real: 5}
  timed_steps: {sample: 3, real: 20}
  mixed_precision:
    sample: [fp32, bf16]
    real: [fp32, fp16]
""")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    params = {"base": {"profile": "sample", "seed": 0, "device": "cpu", "image_size": 512, "launcher": "python"},
              **json.loads(json.dumps(SECTION)), **json.loads(json.dumps(BENCH_SECTION)),
              "generate": {"off_distribution_prompts": ["a cat"]}}
    for key, quick in {"resolution": 32, "timed_steps": 2}.items():  # the sample profile only
        params["bench_train_controlnet"][key]["sample"] = quick
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_dataset(tmp_path / B.DATASET_DIR)
    make_standin("sd_base", tmp_path / "data/models/sd_base")
    monkeypatch.chdir(tmp_path)
    return tmp_path, params


def test_stage_end_to_end(workdir):
    root, _ = workdir
    B.main([])
    report = read_json(root / B.REPORT)  # the numbers: speed, memory, loss per configuration, ratios
    details = read_json(provenance_path(root / B.REPORT))  # the rest
    configs, ratios = report["configs"], report["ratios"]
    assert sorted(configs) == ["bf16", "bf16+checkpointing", "fp32", "fp32+checkpointing"]
    for name, r in configs.items():
        d = details["configs"][name]
        assert r["steps_per_second"] > 0 and r["images_per_second"] == pytest.approx(2 * r["steps_per_second"], rel=1e-4)
        assert r["peak_memory_gib"] >= d["rss_at_start_gib"] > 0 and d["peak_memory_kind"] == "process peak RSS"
        assert len(d["step_seconds"]) == 2 and d["seconds"] == pytest.approx(sum(d["step_seconds"]), abs=1e-5)
        assert (d["resolution"], d["train_batch_size"], d["timed_steps"], d["device"]) == (32, 2, 2, "cpu")
        assert d["gradient_checkpointing"] is name.endswith("+checkpointing")
        assert d["controlnet_dtype"] == "float32"  # the trained weights stay fp32 under mixed precision
        assert ratios[name]["speed"] > 0 and ratios[name]["memory"] > 0 and np.isfinite(r["final_loss"])
    assert details["baseline"] == "fp32" and ratios["fp32"] == {"speed": 1.0, "memory": 1.0}
    fp32, bf16 = details["configs"]["fp32"], details["configs"]["bf16"]
    assert fp32["frozen_dtype"] == "float32" and fp32["mixed_precision"] == "fp32"
    assert bf16["frozen_dtype"] == "bfloat16" and bf16["mixed_precision"] == "bf16"
    assert report["uses_standin_models"] is True and B.STANDIN_WARNING in details["notes"]
    assert B.CPU_NOTE in details["notes"] and details["packages"]["diffusers"]
    assert not list(root.glob("models")) and not (root / "reports/train").exists()  # nothing but the report


def test_fp16_becomes_bf16_on_cpu(workdir, monkeypatch):
    """The real profile's fp16 is replaced on the CPU (the matrix itself is not run here)."""
    root, params = workdir
    params["bench_train_controlnet"]["mixed_precision"] = ["fp32", "fp16"]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    seen = {}

    def fake_matrix(settings, *args, mixed_precision, **kwargs):
        seen.update(settings=settings, mixed_precision=mixed_precision, **kwargs)
        return {"configs": {}, "ratios": {}}

    monkeypatch.setattr(B, "run_matrix", fake_matrix)
    report = B.main([])
    assert seen["mixed_precision"] == ["fp32", "bf16"] and report["mixed_precision_tried"] == ["fp32", "bf16"]
    assert any("fp16 replaced by bf16" in n for n in report["notes"])
    # every other setting is the train_controlnet section's; resolution and batch are this section's
    assert (seen["settings"].resolution, seen["settings"].train_batch_size) == (32, 2)
    assert seen["settings"].learning_rate == 1e-4 and seen["cpu"] is True and seen["gradient_checkpointing"] == [False, True]


def test_out_of_memory_is_recorded_and_ratios_skip_failures(monkeypatch):
    from pipelines.training.controlnet import TrainSettings

    def fail(message):
        def measure(*args, **kwargs):
            raise (torch.OutOfMemoryError if "CUDA out" in message else RuntimeError)(message)
        return measure

    s = TrainSettings(mixed_precision="fp16", gradient_checkpointing=True)
    for message in ("CUDA out of memory. Tried to allocate 2.00 GiB", "CUDA error: out of memory"):
        monkeypatch.setattr(TB, "measure_training", fail(message))
        assert TB._measure_or_oom(s) == {"error": "out of memory", "mixed_precision": "fp16",
                                         "gradient_checkpointing": True}
    monkeypatch.setattr(TB, "measure_training", fail("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other failure is not hidden
        TB._measure_or_oom(s)

    ok = {"steps_per_second": 2.0, "peak_memory_gib": 4.0}
    assert TB.ratios_to_baseline({"fp32": ok, "fp16": {"steps_per_second": 3.0, "peak_memory_gib": 3.0},
                                  "fp16+checkpointing": {"error": "out of memory"}}) == {
        "fp32": {"speed": 1.0, "memory": 1.0}, "fp16": {"speed": 1.5, "memory": 0.75},
        "fp16+checkpointing": {"speed": None, "memory": None}}
    assert TB.ratios_to_baseline({"fp32": {"error": "out of memory"}, "fp16": ok}) == {
        "fp32": {"speed": None, "memory": None}, "fp16": {"speed": None, "memory": None}}


def test_params_profiles_and_errors(workdir):
    _, params = workdir
    _, real = load(B.BenchTrainConfig, "bench_train_controlnet", params, "real")
    assert (real.resolution, real.train_batch_size, real.warmup_steps, real.timed_steps) == (512, 4, 5, 20)
    assert real.mixed_precision == ["fp32", "fp16"] and real.gradient_checkpointing == [False, True]

    def bad(**kw):
        p = json.loads(json.dumps(params))
        p["bench_train_controlnet"].update(kw)
        return load(B.BenchTrainConfig, "bench_train_controlnet", p, "sample")

    with pytest.raises(ParamError, match=r"bench_train_controlnet\.timed_steps: must be > 0"):
        bad(timed_steps=0)
    with pytest.raises(ParamError, match=r"bench_train_controlnet\.warmup_steps: must be > 0"):
        bad(warmup_steps=0)
    with pytest.raises(ParamError, match=r"bench_train_controlnet\.resolution: must be a multiple of 8"):
        bad(resolution=60)
    with pytest.raises(ParamError, match=r"bench_train_controlnet\.mixed_precision\[1\]: 'fp8' is not one of"):
        bad(mixed_precision=["fp32", "fp8"])
    with pytest.raises(ParamError, match=r"bench_train_controlnet\.mixed_precision: must include 'fp32'"):
        bad(mixed_precision=["bf16"])
    with pytest.raises(ParamError, match=r"bench_train_controlnet\.gradient_checkpointing: repeated values"):
        bad(gradient_checkpointing=[False, True, True])
    with pytest.raises(ParamError, match=r"bench_train_controlnet\.gradient_checkpointing\[0\]: expected bool"):
        bad(gradient_checkpointing=[0])


def test_refuses_a_distributed_launch(workdir, monkeypatch):
    from pipelines.errors import PipelineError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineError, match="start it with python"):
        B.main([])
