"""Publishing to the Hub, offline: the staged tree, the card, the checks, and the real client's error path."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from conftest import committed_params
from huggingface_hub import CommitInfo, HfApi, constants

from pipelines import facesynthetics_dataset as FS
from pipelines import hfdata
from pipelines import publish as P
from pipelines.reports import read_report, write_report
from stages import publish as S

ROWS = {"train": 5, "validation": 2}


def _row(i: int) -> dict:
    rng = np.random.default_rng(i)
    img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    return {"id": f"{i:06d}", "image": img, "conditioning_image": np.zeros_like(img), "text": f"face {i}",
            "landmarks": rng.random((68, 2), dtype=np.float32), "headpose": [0.0] * 6, "face_box": [1.0, 2.0, 3.0, 4.0],
            "source_landmarks": rng.random((70, 2), dtype=np.float32), "segmentation": np.zeros((32, 32), np.uint8)}


def make_dataset(root: Path, name: str = "tiny") -> tuple[Path, Path]:
    """A small dataset in the assemble layout (+ its report), as the assemble stage writes it."""
    out = root / "data" / "datasets" / name
    feats = FS.SCHEMA.features
    split_bytes, i = {}, 0
    for split, n in ROWS.items():
        with hfdata.ParquetShardWriter(out, split, feats, rows_per_file=3) as w:
            for _ in range(n):
                w.write(_row(i))
                i += 1
        split_bytes[split] = w.num_bytes
    hfdata.write_card(out, pretty_name="tiny", features=feats, splits=ROWS, license="other",
                      source_datasets=["microsoft/FaceSynthetics"], task_categories=["text-to-image"],
                      split_bytes=split_bytes,
                      body_markdown=f"# tiny\n\n## Training\n\n`train_controlnet.py --dataset_name={out}`\n\n"
                                    "## License\n\nFaceSynthetics license.")
    report = root / "reports" / "datasets" / f"{name}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    write_report(report, {"rows": ROWS, "uses_standin_models": True}, {
                 "train_controlnet_flags": f"--dataset_name={out} --image_column=image",
                 "models": {"spiga": {"id": "s", "revision": "r", "standin": True}},
                 "params": {"assemble": {"rows_per_file": 3}}})  # + tiny.provenance.json, as assemble writes it
    return out, report


@pytest.fixture
def ds(tmp_path):
    return make_dataset(tmp_path)


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused at once
    return port


def _not_found():
    """A RepositoryNotFoundError as the client raises it on a 404 (built without an HTTP response)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    Exception.__init__(err, "404 Client Error: Repository Not Found")
    return err


class Spy:
    """Records calls to HfApi's upload methods (none must happen on the error paths)."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in ("upload_folder", "create_commit", "preupload_lfs_files", "create_repo"):
            monkeypatch.setattr(HfApi, name, self._record(name))

    def _record(self, name):
        def fn(*a, **k):
            self.calls.append(name)
            raise AssertionError(f"{name} must not be called")
        return fn


# ------------------------------------------------------------------------------------------ staging

def test_staged_folder_loads_and_card_matches_features(ds, tmp_path, monkeypatch):
    src, report = ds
    out = tmp_path / "staging"
    files = P.build_staging(src, out, report=read_report(report), repo_id="me/tiny")
    rel = [p.relative_to(out).as_posix() for p in files]
    assert rel == ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                   "data/validation-00000-of-00001.parquet", "sample_grid.png"]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    loaded = datasets.load_dataset(str(out))
    assert {s: len(loaded[s]) for s in loaded} == ROWS
    meta = hfdata.read_card_metadata(out / "README.md")
    card_features = datasets.Features._from_yaml_list(meta["dataset_info"]["features"])
    assert card_features == loaded["train"].features == FS.SCHEMA.features
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == ROWS
    assert meta["license"] == "other" and meta["license_link"].startswith("https://github.com/microsoft/FaceSynthetics")
    text = (out / "README.md").read_text()
    assert "](sample_grid.png)" in text and 'load_dataset("me/tiny")' in text
    assert "--dataset_name=me/tiny" in text and str(src) not in text
    assert text.index("## Source licenses and terms") < text.index("## License")
    assert "- model `spiga`: `s` at `r` (stand-in, random weights)" in text and "rows_per_file: 3" in text
    from PIL import Image
    assert Image.open(out / "sample_grid.png").size == (2 * 160, 2 * 160)  # 2 validation rows x (image | cond)
    # the parquet files are linked, not copied, and the dataset folder is untouched
    assert (out / rel[1]).stat().st_ino == (src / rel[1]).stat().st_ino
    assert "sample_grid.png" not in {p.name for p in src.rglob("*")}


def test_wrong_shard_name_is_rejected(ds, tmp_path):
    src, _ = ds
    (src / "data" / "train-00001-of-00002.parquet").rename(src / "data" / "train-1.parquet")
    with pytest.raises(P.PublishError, match="not a Hub shard name"):
        P.staging_folder(src, tmp_path / "staging")
    with pytest.raises(P.PublishError, match="missing"):
        P.check_shard_names(["data/train-00000-of-00002.parquet"])
    with pytest.raises(P.PublishError, match="not a Hub shard name"):
        P.check_shard_names(["train-00000-of-00001.parquet"])


def test_card_count_mismatch_is_rejected(ds, tmp_path):
    src, _ = ds
    card = src / "README.md"
    card.write_text(card.read_text().replace("num_examples: 2", "num_examples: 3"))
    with pytest.raises(P.PublishError, match="the card says 3 examples, the files hold 2"):
        P.staging_folder(src, tmp_path / "staging")


@pytest.mark.parametrize("bad", ["no-namespace", "a/b/c", "bad id/x", "me/-x", "me/x--y", "", None])
def test_bad_repo_id_errors_before_anything(ds, tmp_path, bad, monkeypatch):
    spy = Spy(monkeypatch)
    with pytest.raises(P.PublishError, match="repo id"):
        P.publish(ds[0], bad, staging_dir=tmp_path / "staging", token="hf_x")
    assert not (tmp_path / "staging").exists() and spy.calls == []


# ------------------------------------------------------------------------------------- the command

def _params(tmp_path: Path, repo_root: Path, **publish) -> Path:
    params = committed_params()
    params["publish"] = {"dataset": "tiny", "repo_id": None, "revision": "main", "private": True, "create_pr": False,
                         "large_threshold_bytes": 5_000_000_000, **publish}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_dry_run_shows_tree_and_writes_nothing(ds, tmp_path, repo_root, monkeypatch, capsys, no_token):
    params = _params(tmp_path, repo_root)
    spy = Spy(monkeypatch)
    monkeypatch.setattr(HfApi, "whoami", lambda *a, **k: spy.calls.append("whoami"))
    monkeypatch.chdir(tmp_path)
    S.main(["--params", str(params), "--repo-id", "me/tiny", "--dry-run"])
    out = capsys.readouterr().out
    assert "would upload data/publish/tiny to datasets/me/tiny@main" in out
    for name in ("README.md", "data/train-00000-of-00002.parquet", "data/validation-00000-of-00001.parquet",
                 "sample_grid.png", "total, 5 files"):
        assert name in out
    assert spy.calls == [] and not (tmp_path / "reports" / "publish").exists()
    assert (tmp_path / "data" / "publish" / "tiny" / "README.md").is_file()


def test_params_section_is_validated(tmp_path, repo_root):
    from stages import config as C
    with pytest.raises(C.ParamError, match="publish.repo_id"):
        C.load(S.PublishConfig, "publish", C.read_params(_params(tmp_path, repo_root, repo_id="not a repo")))
    with pytest.raises(C.ParamError, match="publish.create_pr"):
        C.load(S.PublishConfig, "publish", C.read_params(_params(tmp_path, repo_root, create_pr=True, revision="dev")))
    _, cfg = C.load(S.PublishConfig, "publish", C.read_params(_params(tmp_path, repo_root)))
    with pytest.raises(C.ParamError, match="--repo-id"):
        S.run_publish(cfg)


def test_no_token_errors_before_any_upload(ds, tmp_path, monkeypatch, no_token):
    spy = Spy(monkeypatch)
    monkeypatch.setattr(HfApi, "whoami", lambda *a, **k: spy.calls.append("whoami"))
    with pytest.raises(P.PublishError, match="no Hugging Face token.*HF_TOKEN"):
        P.publish(ds[0], "me/tiny", staging_dir=tmp_path / "staging")
    assert spy.calls == []


def test_unreachable_hub_is_a_clear_error(ds, tmp_path, monkeypatch):
    """The real huggingface_hub client against a closed local port: the network error path is real."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(P.PublishError) as err:
        P.publish(ds[0], "me/tiny", token="hf_fake", staging_dir=tmp_path / "staging")
    assert endpoint in str(err.value) and "cannot reach the Hub" in str(err.value)
    # HF_HUB_OFFLINE (set for the whole suite) is named too, before any request
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(P.PublishError, match="HF_HUB_OFFLINE"):
        P.publish(ds[0], "me/tiny", token="hf_fake", staging_dir=tmp_path / "staging")


def test_interrupted_upload_is_a_clear_error(ds, tmp_path, monkeypatch, repo_root):
    """Checks pass (faked), then the real upload_folder meets a closed port: no report, a rerun hint."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "whoami", lambda self, token=None, **k: {"name": "me", "orgs": [],
                                                                        "auth": {"accessToken": {"role": "write"}}})
    monkeypatch.setattr(HfApi, "repo_info", lambda self, *a, **k: type("I", (), {"private": True})())
    monkeypatch.chdir(tmp_path)
    _, cfg = S.C.load(S.PublishConfig, "publish", S.C.read_params(_params(tmp_path, repo_root, repo_id="me/tiny")))
    with pytest.raises(P.PublishError, match="Run the same command again") as err:
        S.run_publish(cfg, token="hf_fake")
    assert endpoint in str(err.value)
    assert not (tmp_path / "reports" / "publish").exists()


@pytest.mark.parametrize("whoami,match", [
    ({"name": "me", "orgs": [], "auth": {"accessToken": {"role": "read"}}}, "read-only"),
    ({"name": "someone", "orgs": [{"name": "club"}], "auth": {"accessToken": {"role": "write"}}}, "not writable"),
])
def test_not_writable_errors_before_upload(ds, tmp_path, monkeypatch, whoami, match):
    spy = Spy(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "whoami", lambda self, **k: whoami)
    def missing(self, *a, **k):
        raise _not_found()
    monkeypatch.setattr(HfApi, "repo_info", missing)
    with pytest.raises(P.PublishError, match=match):
        P.publish(ds[0], "me/tiny", token="hf_fake", staging_dir=tmp_path / "staging")
    assert spy.calls == []


def test_successful_upload_records_commit(ds, tmp_path, repo_root, monkeypatch):
    calls = {}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "whoami", lambda self, **k: {"name": "me", "orgs": [],
                                                            "auth": {"accessToken": {"role": "write"}}})
    def missing(self, *a, **k):
        raise _not_found()
    monkeypatch.setattr(HfApi, "repo_info", missing)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: calls.setdefault("create_repo", (repo_id, k)))

    def upload_folder(self, **k):
        calls["upload_folder"] = k
        assert sorted(p.relative_to(k["folder_path"]).as_posix() for p in Path(k["folder_path"]).rglob("*")
                      if p.is_file())[0] == "README.md"
        return CommitInfo(commit_url="https://huggingface.co/datasets/me/tiny/commit/" + "a" * 40, commit_message="m",
                          commit_description="", oid="a" * 40, pr_url="https://huggingface.co/datasets/me/tiny/discussions/1")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.chdir(tmp_path)
    S.main(["--params", str(_params(tmp_path, repo_root)), "--repo-id", "me/tiny", "--public", "--create-pr",
            "--token", "hf_fake"])
    assert calls["create_repo"][1]["private"] is False and calls["create_repo"][1]["repo_type"] == "dataset"
    assert calls["upload_folder"]["create_pr"] is True and calls["upload_folder"]["repo_type"] == "dataset"
    rep = json.loads((tmp_path / "reports" / "publish" / "tiny.json").read_text())
    assert rep["commit_id"] == "a" * 40 and rep["repo_id"] == "me/tiny"
    assert rep["pr_url"].endswith("/discussions/1") and rep["method"] == "upload_folder"
    assert rep["load"] == f'datasets.load_dataset("me/tiny", revision="{"a" * 40}")'
    assert rep["bytes"] == sum(f["size"] for f in rep["files"]) and len(rep["files"]) == 5
    assert len(rep["card_sha256"]) == 64 and len(rep["dataset_report_sha256"]) == 64


def test_large_upload_uses_upload_large_folder_when_available(ds, tmp_path, monkeypatch):
    class Api:
        endpoint = "https://hub.test"

        def whoami(self, **k):
            return {"name": "me", "orgs": [], "auth": {"accessToken": {"role": "write"}}}

        def repo_info(self, repo_id, **k):
            return type("I", (), {"private": True, "sha": "b" * 40})()

        def upload_large_folder(self, **k):
            self.large = k

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = Api()
    with pytest.raises(P.PublishError, match="cannot open a pull request"):
        P.publish(ds[0], "me/tiny", create_pr=True, large=True, token="hf_x", api=api, staging_dir=tmp_path / "s")
    res = P.publish(ds[0], "me/tiny", large=True, token="hf_x", api=api, staging_dir=tmp_path / "s")
    assert res["method"] == "upload_large_folder" and res["commit_id"] == "b" * 40
    assert api.large["folder_path"] == str(tmp_path / "s") and api.large["revision"] == "main"
