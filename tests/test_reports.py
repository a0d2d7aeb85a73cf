"""The report writer: metrics files hold numbers only, everything else goes to the .provenance.json beside them."""
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.reports import (
    METRIC_MAX_LEAVES,
    MetricsError,
    metric_leaves,
    provenance_path,
    read_json,
    read_report,
    split_report,
    write_report,
)

MAX_READABLE_LEAVES = 40  # what `dvc metrics show` can show per file and stay readable


def assert_readable_metrics(path: str | Path, max_leaves: int = MAX_READABLE_LEAVES) -> dict:
    """A metrics file as a stage wrote it: fewer than ``max_leaves`` values, every one a number, a bool or
    null (no text), ``uses_standin_models`` among them, and its provenance file beside it. Returns the leaves."""
    path = Path(path)
    leaves: dict = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                leaves[f"{prefix}{k}"] = v

    walk(read_json(path), "")
    assert len(leaves) < max_leaves, f"{path}: {len(leaves)} metric values"
    text = {k: v for k, v in leaves.items() if v is not None and not isinstance(v, (bool, int, float))}
    assert not text, f"{path}: non-numeric metrics {text}"
    assert isinstance(leaves.get("uses_standin_models"), bool)
    assert provenance_path(path).is_file()
    return leaves


def test_provenance_path_is_the_sibling():
    assert provenance_path("reports/metrics/m.json") == Path("reports/metrics/m.provenance.json")
    assert provenance_path(Path("reports/bench/generate_x.json")).name == "generate_x.provenance.json"
    for bad in ("reports/x.yaml", "reports/x.provenance.json"):
        with pytest.raises(ValueError):
            provenance_path(bad)


def test_write_report_writes_both_files_sorted_and_rounded(tmp_path):
    path = tmp_path / "reports/datasets/d.json"
    metrics = {"rows": {"train": 3, "total": 4}, "fid": np.float32(1.23456789), "nan_value": float("nan"),
               "ok": np.bool_(True), "uses_standin_models": False}
    details = {"models": {"spiga": {"id": "s", "revision": "r"}}, "note": "text is fine here", "per_item": [1, 2]}
    assert write_report(path, metrics, details) == (path, tmp_path / "reports/datasets/d.provenance.json")
    text = path.read_text()
    assert json.loads(text) == {"fid": 1.234568, "nan_value": None, "ok": True, "rows": {"total": 4, "train": 3},
                                "uses_standin_models": False}
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert read_json(provenance_path(path)) == details
    assert read_report(path)["models"]["spiga"]["id"] == "s" and read_report(path)["fid"] == 1.234568
    write_report(path, metrics, details)  # no timestamps: a rewrite gives the same bytes
    assert path.read_text() == text


@pytest.mark.parametrize("bad, match", [
    ({"implementation": "clean-fid 0.1.35"}, "'implementation': str"),
    ({"fid": {"value": 1.0, "mode": "clean"}}, "'fid.mode': str"),
    ({"step_seconds": [0.1, 0.2]}, "'step_seconds': list"),
    ({"per_prompt": {"a cat": {"win_rate": 1.0}}}, "'per_prompt.a cat': not a plain name"),
    ({"a": {"b": {"c": {"d": 1}}}}, "'a.b.c.d': nested deeper"),
    ({"x.y": 1}, "'x.y': not a plain name"),
])
def test_text_lists_and_deep_breakdowns_are_refused(tmp_path, bad, match):
    path = tmp_path / "m.json"
    with pytest.raises(MetricsError, match=match):
        write_report(path, {**bad, "uses_standin_models": True}, {})
    assert not path.exists() and not provenance_path(path).exists()  # nothing written


def test_uses_standin_models_is_required_and_bool(tmp_path):
    with pytest.raises(MetricsError, match="uses_standin_models"):
        write_report(tmp_path / "m.json", {"fid": 1.0}, {})
    with pytest.raises(MetricsError, match="uses_standin_models"):
        write_report(tmp_path / "m.json", {"fid": 1.0, "uses_standin_models": "yes"}, {})


@pytest.mark.parametrize("details", [{"uses_standin_models": False}, {"provenance": {"uses_standin_models": False}},
                                     {"runs": [{"model": {"uses_standin_models": True}}]}])
def test_the_standin_flag_is_one_flag_at_the_top(tmp_path, details):
    """A report never says true at the top and false inside: the details may not repeat the flag anywhere."""
    with pytest.raises(MetricsError, match="uses_standin_models is one flag"):
        write_report(tmp_path / "r.json", {"fid": 1.0, "uses_standin_models": True}, details)
    assert not list(tmp_path.iterdir())


def test_too_many_values_are_refused():
    with pytest.raises(MetricsError, match="at most"):
        metric_leaves({**{f"v{i}": i for i in range(METRIC_MAX_LEAVES + 1)}, "uses_standin_models": False})
    assert len(metric_leaves({"a": {"b": {"c": 1}}, "n": None, "uses_standin_models": False})) == 3


def test_split_report_takes_the_named_numbers_and_leaves_the_rest():
    report = {"fid": {"value": 3.0, "mode": "clean", "note": "biased at small n"},
              "control": {"landmark_nme": {"mean": 0.1, "failure_threshold": 0.08}, "count": 4},
              "prompt_adherence": None, "rows": {"train": 2, "validation": 1}, "models": {"a": {"id": "x"}},
              "uses_standin_models": True}
    metrics, details = split_report(report, ["fid.value", "control.landmark_nme.mean", "control.count", "rows",
                                             "prompt_adherence.win_rate", "uses_standin_models"])
    assert metrics == {"fid": {"value": 3.0}, "control": {"landmark_nme": {"mean": 0.1}, "count": 4},
                       "rows": {"train": 2, "validation": 1}, "prompt_adherence": {"win_rate": None},
                       "uses_standin_models": True}
    assert details == {"fid": {"mode": "clean", "note": "biased at small n"},
                       "control": {"landmark_nme": {"failure_threshold": 0.08}}, "prompt_adherence": None,
                       "models": {"a": {"id": "x"}}}
    assert report["fid"]["value"] == 3.0  # the report itself is left whole
    with pytest.raises(KeyError, match="fid.typo"):
        split_report(report, ["fid.typo"])


def test_split_then_read_gives_the_report_back(tmp_path):
    report = {"configs": {"fp32": {"steps_per_second": 2.0, "step_seconds": [0.5, 0.5], "dtype": "float32"}},
              "ratios": {"fp32": {"speed": 1.0}}, "notes": ["cpu"], "uses_standin_models": True}
    path = tmp_path / "bench.json"
    write_report(path, *split_report(report, ["configs.fp32.steps_per_second", "ratios", "uses_standin_models"]))
    assert read_report(path) == report
    assert assert_readable_metrics(path) == {"configs.fp32.steps_per_second": 2.0, "ratios.fp32.speed": 1.0,
                                             "uses_standin_models": True}


def test_evaluation_metrics_stay_small(tmp_path):
    """The split of a report shaped like pipelines.evaluation.evaluate_generated's (plus what the stage adds):
    tens of numbers; implementation strings, settings, the per-prompt breakdown and models in the provenance."""
    from pipelines.evaluation import REPORT_METRICS

    prompts = [f"prompt {i}" for i in range(8)]
    report = {
        "model_name": "m", "num_images": 4,
        "fid": {"value": 31.2, "implementation": "clean-fid 0.1.35", "mode": "clean", "feature_layer": "pool3 2048",
                "image_size": 299, "num_generated": 4, "num_reference": 4, "reference_sha256": "a" * 64,
                "reference_split": "validation", "note": "biased at small n"},
        "kid": {"value": 0.02, "num_subsets": 100, "subset_size": 4},
        "inception_score": {"mean": 1.0, "std": 0.0, "splits": 4, "implementation": "torchmetrics"},
        "clip_score": {"value": 0.0, "implementation": "torchmetrics CLIPScore", "texts": "captions"},
        "prompt_adherence": {"num_images": 8, "reference_text": "a face", "clip_score": 0.0, "prompt_win_rate": 0.375,
                             "per_prompt": {p: {"count": 1, "win_rate": 0.0, "clip_score": 0.0} for p in prompts},
                             "rule": "wins when...", "prompts": "the fixed prompts", "why": "overfitting"},
        "control": {"count": 4, "face_detection_rate": 0.0, "spiga_nonfinite": 0, "min_iou": 0.3,
                    "face_detector": "dlib_hog", "resolution": 512, "condition_landmarks": "text",
                    "condition_pose": "text",
                    "landmark_nme": {"count": 4, "mean": 0.13, "median": 0.13, "p90": 0.13, "failure_rate": 1.0,
                                     "failure_threshold": 0.08},
                    "pose_error_deg": {"yaw": 0.0, "pitch": 0.0, "roll": 0.0, "mean_abs": 0.0, "geodesic_mean": 0.0,
                                       "geodesic_median": 0.0}},
        "models": {"controlnet": {"id": "c", "revision": "r", "standin": True}},
        "uses_standin_models": True, "generation": {"base_seed": 0, "count": 4, "split": "validation"},
        "packages": {"torch": "2"}, "runtime": {"device": "cpu"}, "params": {"evaluate": {"kid_subsets": 100}},
        "note": "STAND-IN models were used",
    }
    path = tmp_path / "reports/metrics/m.json"
    write_report(path, *split_report(report, REPORT_METRICS))
    leaves = assert_readable_metrics(path)
    assert leaves["fid.value"] == 31.2 and leaves["control.landmark_nme.mean"] == 0.13
    assert leaves["prompt_adherence.prompt_win_rate"] == 0.375 and "control.pose_error_deg.yaw" in leaves
    details = read_json(provenance_path(path))
    assert details["fid"]["implementation"] == "clean-fid 0.1.35" and details["fid"]["reference_sha256"] == "a" * 64
    assert set(details["prompt_adherence"]["per_prompt"]) == set(prompts)
    assert details["models"]["controlnet"]["revision"] == "r" and details["note"]
