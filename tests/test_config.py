"""params.yaml: the profile switch, validation errors that name the key, and both profiles complete."""
import errno
import importlib
import re
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
import yaml
from conftest import committed_params

from stages import config as C

# dvc stage -> (module, config class or None for a model list read by stages.fetch_models, params section)
STAGES = {
    "fetch_facesynthetics": ("stages.fetch_facesynthetics", "FetchConfig", "fetch_facesynthetics"),
    "fetch_models": ("stages.fetch_models", None, "fetch_models"),
    "annotate": ("stages.annotate", "AnnotateConfig", "annotate"),
    "caption": ("stages.caption", "CaptionConfig", "caption"),
    "assemble": ("stages.assemble", "AssembleConfig", "assemble"),
    "bench_facesynthetics": ("stages.bench_facesynthetics", "BenchConfig", "bench_facesynthetics"),
    "fetch_generation_models": ("stages.fetch_models", None, "fetch_generation_models"),
    "generate": ("stages.generate", "GenerateConfig", "generate"),
    "reference_stats": ("stages.reference_stats", "ReferenceStatsConfig", "reference_stats"),
    "evaluate": ("stages.evaluate", "EvaluateConfig", "evaluate"),
    "fetch_coco_annotations": ("stages.fetch_coco", "FetchCocoConfig", "fetch_coco"),
    "select_coco": ("stages.select_coco", "SelectCocoConfig", "select_coco"),
    "fetch_coco_images": ("stages.fetch_coco", "FetchCocoConfig", "fetch_coco"),
    "assemble_coco": ("stages.assemble_coco", "AssembleCocoConfig", "assemble_coco"),
    "bench_coco_select": ("stages.bench_coco_select", "BenchCocoConfig", "bench_coco_select"),
    "headpose_facesynthetics": ("stages.headpose_facesynthetics", "HeadposeFaceSyntheticsConfig",
                                "headpose_facesynthetics"),
    "headpose_photos": ("stages.headpose_photos", "HeadposePhotosConfig", "headpose_photos"),
    "validate_headpose": ("stages.validate_headpose", "ValidateHeadposeConfig", "validate_headpose"),
    "celeba": ("stages.celeba", "CelebAConfig", "celeba"),
    "train_ddpm": ("stages.train_ddpm", "TrainDDPMConfig", "train_ddpm"),
    "train_controlnet": ("stages.train_controlnet", "TrainControlNetConfig", "train_controlnet"),
    "bench_train_controlnet": ("stages.bench_train_controlnet", "BenchTrainConfig", "bench_train_controlnet"),
}
# commands that read params but are not DVC stages (side effects): name -> (module, config class, section)
COMMANDS = {"publish": ("stages.publish", "PublishConfig", "publish"),
            "gpu_check": ("stages.gpu_check", "GpuCheckConfig", "gpu_check")}
SECTIONS = sorted({section for _, _, section in STAGES.values()})


def stage_config(stage: str, params: dict, profile: str | None):
    """``(base, config)`` of ``stage`` parsed the way its ``main`` does: from the keys its module declares only."""
    module_name, cls_name, section = {**STAGES, **COMMANDS}[stage]
    module = importlib.import_module(module_name)
    keys = [k.format(section=section) for k in module.PARAMS]
    mine = C.declared(params, keys)
    if cls_name is None:
        return module.load_config(mine, section, profile)
    return C.load(getattr(module, cls_name), section, mine, profile)


@dataclass(frozen=True)
class Toy:
    mode: Literal["a", "b"]
    n: int
    rate: float = 0.5
    name: str | None = None


def test_per_profile_values_resolve_at_any_depth():
    params = {"s": {"n": {"sample": 2, "real": 3}, "mode": "a", "spec": {"sample": {"x": 1}, "real": {"x": {"sample": 0, "real": 5}}}}}
    assert C.section(params, "s", "sample") == {"n": 2, "mode": "a", "spec": {"x": 1}}
    assert C.section(params, "s", "real") == {"n": 3, "mode": "a", "spec": {"x": 5}}
    assert C.value(params, "s.n", "real") == 3
    with pytest.raises(C.ParamError, match="s.n: differs by profile, but the stage does not declare base.profile"):
        C.section(params, "s", None)


def test_an_override_of_a_per_profile_key_wins_in_every_profile():
    """The defect this design removes: a top-level value that a profile sub-section silently overrode."""
    params = {"s": {"n": 30, "mode": "a"}}  # what `-S s.n=30` leaves of {sample: 2, real: 3}
    assert C.section(params, "s", "sample")["n"] == C.section(params, "s", "real")["n"] == 30


def test_a_stage_gets_only_the_keys_it_declares(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"base": {"profile": "sample", "seed": 1, "device": "cpu"}, "a": {"k": 1}, "b": {"k": 2}}))
    params = C.read_params(path, ["base.profile", "a"])
    assert params == {"base": {"profile": "sample"}, "a": {"k": 1}}
    assert C.load_base(params).device is None
    with pytest.raises(C.ParamError, match="'b' is missing or not declared"):
        C.section(params, "b", "sample")
    with pytest.raises(C.ParamError, match="has no a.nope"):
        C.read_params(path, ["a.nope"])


@pytest.mark.parametrize("values, message", [
    ({"mode": "c", "n": 1}, "s.mode: 'c' is not one of 'a', 'b'"),
    ({"mode": "a"}, "s.n is missing"),
    ({"mode": "a", "n": 1, "speed": 2}, "s: unknown key(s) speed"),
    ({"mode": "a", "n": "many"}, "s.n: expected int"),
    ({"mode": "a", "n": True}, "s.n: expected int"),
])
def test_errors_name_the_key(values, message):
    with pytest.raises(C.ParamError) as exc:
        C.parse(Toy, values, "s")
    assert message in str(exc.value)


def test_parse_converts_and_defaults():
    toy = C.parse(Toy, {"mode": "b", "n": 3, "rate": 1}, "s")
    assert toy == Toy("b", 3, 1.0, None) and isinstance(toy.rate, float)


def test_bad_profile_is_rejected(repo_root):
    params = committed_params()
    with pytest.raises(C.ParamError, match="base.profile"):
        C.section(params, "annotate", "staging")


def test_dvc_stages_and_params_sections_match(repo_root):
    dvc = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    params = committed_params()
    assert set(dvc) == set(STAGES)
    assert set(params) == {"base", "controlnets", "ddpm_runs", *SECTIONS, *(section for _, _, section in COMMANDS.values())}
    for name, stage in dvc.items():
        module, _, section = STAGES[name]
        stage = stage.get("do", stage)  # a foreach stage: its template
        assert f"-m {module}" in stage["cmd"], name
        assert module != "stages.fetch_models" or f"--section {section}" in stage["cmd"], name
        assert section in stage.get("params", []), f"{name} does not depend on its params section {section}"
        for dep in stage.get("deps", []):
            if not dep.startswith(("data/", "${")):
                assert (repo_root / dep).exists(), f"{name}: dep {dep} does not exist"


def test_every_generated_model_is_made_by_a_stage(repo_root):
    """generate/evaluate run once per controlnets entry; each ControlNet folder is some stage's output, and neither
    stage depends on the list itself (adding a model runs only its own two stages)."""
    dvc = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    params = committed_params()
    for name in ("generate", "evaluate"):
        assert dvc[name]["foreach"] == "${controlnets}" and "--model ${key}" in dvc[name]["do"]["cmd"]
        assert "controlnets" not in dvc[name]["do"]["params"]
    assert "--controlnet ${item}" in dvc["generate"]["do"]["cmd"] and "${item}" in dvc["generate"]["do"]["deps"]
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in dvc.values() for o in s.get("outs", [])}
    models = params["controlnets"]
    assert set(models) == {"uncannyfaces_25K", "controlnet_landmarks"}
    for model, folder in models.items():
        assert folder in outs, f"controlnets.{model}: {folder} is no stage's output"


def test_every_ddpm_run_is_one_stage_with_a_known_conditioning(repo_root):
    """train_ddpm runs once per ddpm_runs entry (name -> conditioning) and does not depend on the list itself."""
    from pipelines.ddpm import CONDITIONINGS

    dvc = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]["train_ddpm"]
    runs = committed_params()["ddpm_runs"]
    assert dvc["foreach"] == "${ddpm_runs}" and "--run ${key} --conditioning ${item}" in dvc["do"]["cmd"]
    assert "ddpm_runs" not in dvc["do"]["params"]
    assert set(runs.values()) <= set(CONDITIONINGS) and {"none", "input_channels"} <= set(runs.values())


@pytest.mark.parametrize("profile", C.PROFILES)
@pytest.mark.parametrize("stage", sorted(STAGES) + sorted(COMMANDS))
def test_every_stage_config_is_complete_and_valid(stage, profile, one_gpu):
    """The real configuration cannot run here, but it must parse and validate like the sample one, from the
    keys the stage declares (on a machine with one GPU, as the real profile expects: fp16 is refused on a CPU)."""
    base, cfg = stage_config(stage, committed_params(), profile)
    assert base.profile in (profile, None)
    assert cfg is not None


def test_real_profile_points_at_the_real_sources(repo_root):
    params = committed_params()
    fetch = C.section(params, "fetch_facesynthetics", "real")
    assert fetch["source"] == "official"
    assert fetch["url"].format(subset=fetch["subset"]) == \
        "https://facesyntheticspubwedata.blob.core.windows.net/iccv-2021/dataset_100000.zip"
    models = C.section(params, "fetch_models", "real")
    assert models["blip"] == {"source": "hub", "id": "Salesforce/blip-image-captioning-large", "revision": "main"}
    assert models["spiga"]["id"] == "spiga_300wpublic.pt" and "1YrbScfMzrAAWMJQYgxdLZ9l57nmTdpQC" in models["spiga"]["url"]
    from spiga.inference.config import MODELS_URL  # the official URL, as the spiga package ships it
    assert models["spiga"]["url"] == MODELS_URL["300wpublic"]


def test_real_profile_sections_agree(repo_root, one_gpu):
    """The real sections fit together: the held-out validation leaves training rows, the recipe makes about
    one epoch of them (the seed: three epochs overfit), and generation has the conditions it asks for."""
    from pipelines.sources.facesynthetics import SUBSET_SIZES
    from pipelines.training.loop import epochs_seen
    from stages.schemas.train_controlnet import OVERFIT_EPOCHS

    params = committed_params()
    faces = SUBSET_SIZES[C.section(params, "fetch_facesynthetics", "real")["subset"]]
    validation = C.section(params, "assemble", "real")["validation_count"]
    base, train = stage_config("train_controlnet", params, "real")
    train_rows = faces - validation
    assert train_rows > 10 * validation
    epochs = epochs_seen(train.max_train_steps, train.settings(base.seed), 1, train_rows)
    assert 0.5 < epochs < OVERFIT_EPOCHS
    generate = C.section(params, "generate", "real")
    assert generate["max_images"] <= validation and generate["off_distribution_conditions"] <= validation


# ---- values that make garbage are refused before any work, naming the dotted key ----

def _float_leaves(node, prefix=""):
    """Dotted keys of every float in ``node`` (lists included, as key[i])."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _float_leaves(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _float_leaves(v, f"{prefix}[{i}]")
    elif isinstance(node, float):
        yield prefix


def _set(params, dotted, value):
    import re

    parts = [p for p in re.split(r"\.|\[(\d+)\]", dotted) if p]
    node = params
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_numbers_are_refused_for_every_stage(bad):
    """Every float a stage reads (learning_rate, box_margin, thresholds, ...): .inf and .nan refused, key named."""
    checked = 0
    for stage in sorted(STAGES) + sorted(COMMANDS):
        module_name, cls_name, section = {**STAGES, **COMMANDS}[stage]
        if cls_name is None:
            continue
        params = C.declared(committed_params(), [k.format(section=section) for k in
                                                importlib.import_module(module_name).PARAMS])
        resolved = {name: C.section(params, name, "sample") for name in params}
        for key in _float_leaves(resolved[section], section):
            mine = {name: dict(value) for name, value in resolved.items()}
            mine = yaml.safe_load(yaml.safe_dump(mine))
            _set(mine, key, bad)
            with pytest.raises(C.ParamError, match=r"must be a finite number") as err:
                stage_config(stage, mine, "sample")
            assert str(err.value).startswith(key.split("[")[0]), (stage, key, err.value)
            checked += 1
    assert checked >= 15  # learning_rate, box_margin, thresholds, guidance and conditioning scales, ...


@pytest.mark.parametrize(("value", "message"), [(-1, "must be > 0"), (0, "must be > 0")])
def test_non_positive_image_size_is_refused(value, message):
    params = yaml.safe_load(yaml.safe_dump(committed_params()))
    params["base"]["image_size"] = value
    with pytest.raises(C.ParamError, match=rf"^base\.image_size: {message}"):
        stage_config("annotate", params, "sample")


@pytest.mark.parametrize("device", ["tpu", "cuda:7", "cuda:x", "cpu:1", "auto:0"])
def test_devices_this_machine_lacks_are_refused_naming_the_key(device, one_gpu):
    params = yaml.safe_load(yaml.safe_dump(committed_params()))
    params["base"]["device"] = device
    for stage in ("annotate", "train_controlnet", "headpose_photos", "validate_headpose", "generate"):
        with pytest.raises(C.ParamError, match=r"^base\.device: "):
            stage_config(stage, params, "sample")


def test_devices_that_exist_are_accepted(one_gpu):
    params = yaml.safe_load(yaml.safe_dump(committed_params()))
    for device in ("auto", "cpu", "cuda", "cuda:0"):
        params["base"]["device"] = device
        assert stage_config("annotate", params, "sample")[0].device == device


@pytest.mark.parametrize(("stage", "key"), [("annotate", "annotate.precision"), ("caption", "caption.precision"),
                                            ("generate", "generate.precision"),
                                            ("train_controlnet", "train_controlnet.mixed_precision")])
def test_fp16_on_the_cpu_is_refused_for_every_stage(stage, key, monkeypatch):
    """fp16 on a CPU would discard finished fp32 shards and crawl (annotate) or record fp16 while computing fp32
    (caption): refused before any work by the config layer, for every stage alike; bf16 and auto pass."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = yaml.safe_load(yaml.safe_dump(committed_params()))
    section, field = key.split(".")
    for device in ("cpu", "auto"):
        params["base"]["device"] = device
        params[section][field] = "fp16"
        with pytest.raises(C.ParamError, match=rf"^{key}: fp16 needs a GPU"):
            stage_config(stage, params, "sample")
        params[section][field] = "bf16"
        stage_config(stage, params, "sample")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the same config on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    params["base"]["device"], params[section][field] = "auto", "fp16"
    stage_config(stage, params, "sample")


def test_malformed_params_file_is_one_line_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("base:\n  profile: sample\n  seed: [0\nannotate:\n  box_margin: 5\n")
    with pytest.raises(C.ParamError, match=rf"^{re.escape(str(bad))}:\d+:\d+: not valid YAML: ") as err:
        C.read_params(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit) as stop:
        C.run(lambda: C.read_params(bad))
    assert stop.value.code == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith(f"error: {bad}:")


@pytest.mark.parametrize(("err", "text"), [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
                                         (errno.EACCES, "Permission denied")])
def test_write_failures_are_one_line_naming_the_path(tmp_path, capsys, err, text):
    """A full disk or a read-only folder ends in one line naming the path (no traceback), exit 2."""
    target = tmp_path / "reports" / "metrics.json"

    def write():
        raise OSError(err, text, str(target))

    with pytest.raises(SystemExit) as stop:
        C.run(write)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {target}: {text}"


def test_other_os_errors_keep_their_traceback():
    with pytest.raises(OSError, match="no file involved"):
        C.run(lambda: (_ for _ in ()).throw(OSError("no file involved")))
