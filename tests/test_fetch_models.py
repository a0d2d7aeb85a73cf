"""fetch_models: stand-ins built like real checkpoints and loaded by the real loaders; real sources fail clearly offline."""
from pathlib import Path

import pytest
from conftest import committed_params, write_committed_params

from pipelines.captions import BlipCaptioner
from pipelines.digests import tree_digest
from pipelines.faces.spiga import SpigaAnnotator
from pipelines.model_store import fetch_hub_snapshot, make_standin
from pipelines.reports import read_model_manifest
from pipelines.sources.downloads import DownloadError


def test_sample_profile_builds_loadable_standins(tmp_path: Path, repo_root: Path, monkeypatch) -> None:
    from stages import fetch_models

    write_committed_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    fetch_models.main([])
    spiga, blip = read_model_manifest("data/models/spiga"), read_model_manifest("data/models/blip")
    assert spiga.standin and blip.standin and spiga.id == "spiga_300wpublic.pt"
    assert spiga.revision == tree_digest("data/models/spiga")  # the manifest pins the bytes
    SpigaAnnotator.load(Path("data/models/spiga") / spiga.id, "cpu")
    BlipCaptioner.load("data/models/blip", "cpu")


@pytest.mark.parametrize("role", ["sd_base", "clip"])
def test_standin_files_do_not_depend_on_offline_mode(tmp_path: Path, monkeypatch, role: str) -> None:
    """HF_HUB_OFFLINE makes transformers record local_files_only in a reloaded tokenizer's config: a stand-in
    built by the tests (offline) and by `make demo` (online) must be the same files."""
    import transformers.tokenization_utils_base as tub

    monkeypatch.setattr(tub, "is_offline_mode", lambda: True)
    offline = make_standin(role, tmp_path / "offline", seed=0)
    monkeypatch.setattr(tub, "is_offline_mode", lambda: False)
    online = make_standin(role, tmp_path / "online", seed=0)
    assert online.revision == offline.revision


def test_standins_are_reproducible(tmp_path: Path) -> None:
    a, b = make_standin("blip", tmp_path / "a", seed=0), make_standin("blip", tmp_path / "b", seed=0)
    assert a.revision == b.revision
    assert make_standin("blip", tmp_path / "c", seed=1).revision != a.revision


def test_hub_source_offline_names_the_model(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="Salesforce/blip-image-captioning-large@main"):
        fetch_hub_snapshot("blip", "Salesforce/blip-image-captioning-large", "main", tmp_path / "blip",
                           tmp_path / "cache")
    assert not (tmp_path / "blip").exists()  # nothing half-written


def test_hub_snapshot_is_kept_outside_the_output(tmp_path: Path, monkeypatch) -> None:
    """DVC deletes a stage's outputs before it re-runs: the snapshot lives in the cache folder and the output
    gets links to it, so a rerun (a code edit elsewhere, a second profile switch) downloads nothing again."""
    import huggingface_hub

    downloaded = []

    class Api:
        def model_info(self, repo_id, revision):
            return type("Info", (), {"sha": "c" * 40})()

    def snapshot_download(repo_id, revision, local_dir, allow_patterns):
        local_dir = Path(local_dir)
        for name in ("config.json", "unet/model.safetensors"):
            if not (local_dir / name).is_file():  # what the hub client does: skip files already there
                (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
                (local_dir / name).write_text(name)
                downloaded.append(name)
        (local_dir / ".cache").mkdir(exist_ok=True)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for _ in range(2):
        info = fetch_hub_snapshot("sd_base", "org/sd", "main", tmp_path / "out", tmp_path / "cache")
    assert downloaded == ["config.json", "unet/model.safetensors"]  # once
    assert info.revision == "c" * 40 and (tmp_path / "cache/hub/org--sd" / ("c" * 40) / "config.json").is_file()
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()) == \
        ["config.json", "facecontrol_model.json", "unet/model.safetensors"]


def test_spiga_from_the_hub_is_rejected(tmp_path: Path, repo_root: Path) -> None:
    from stages import config as C
    from stages.fetch_models import load_config

    params = committed_params()
    params["fetch_models"]["spiga"]["real"] = {"source": "hub", "id": "x/y", "revision": "main"}
    with pytest.raises(C.ParamError, match="fetch_models.spiga.source"):
        load_config(params, "fetch_models", "real")


def test_unknown_standin_role_is_rejected(repo_root: Path) -> None:
    from stages import config as C
    from stages.fetch_models import load_config

    params = committed_params()
    params["fetch_models"]["gpt"] = {"source": "standin"}
    with pytest.raises(C.ParamError, match="fetch_models.gpt.source: no stand-in exists"):
        load_config(params, "fetch_models", "sample")


def test_torchscript_standin_revision_is_its_weights(tmp_path: Path, repo_root: Path) -> None:
    """The revision follows the weights only (a TorchScript archive's bytes depend on the interpreter that wrote
    it unless it is made reproducible, as the stand-in's is), so a rebuild elsewhere gives the same revision."""
    import subprocess
    import sys

    a = make_standin("inception", tmp_path / "a", seed=0)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pipelines.model_store import make_standin; "
            "print(make_standin('inception', sys.argv[2], seed=0).revision)")
    out = subprocess.run([sys.executable, "-c", code, str(repo_root), str(tmp_path / "b")], capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout.split()[-1]
    assert (tmp_path / "a" / a.id).read_bytes() == (tmp_path / "b" / a.id).read_bytes()  # and DVC's hash too
    assert out == a.revision
    assert make_standin("inception", tmp_path / "c", seed=1).revision != a.revision


def test_torchscript_weights_need_a_pinned_sha256(tmp_path: Path) -> None:
    """A TorchScript file runs code when loaded: unpinned, it is not installed and the error gives its sha256 to
    pin; pinned, it is installed from the cache without a second download."""
    import hashlib

    import torch
    from test_downloads import Server

    from pipelines.model_store import fetch_weights_file

    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "net.pt")
    payload = (tmp_path / "net.pt").read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    srv = Server(payload)
    try:
        with pytest.raises(DownloadError, match=f"TorchScript .*pins no sha256.*sha256 is {digest}"):
            fetch_weights_file("inception", srv.url, "net.pt", tmp_path / "out", tmp_path / "cache")
        assert not (tmp_path / "out").exists()
        info = fetch_weights_file("inception", srv.url, "net.pt", tmp_path / "out", tmp_path / "cache", sha256=digest)
        assert len(srv.requests) == 1 and info.revision == digest and "pinned" in info.note
        assert (tmp_path / "out" / "net.pt").read_bytes() == payload
        srv.body = b"\0" * 64  # not TorchScript: unpinned is installed, and its manifest says so
        other = fetch_weights_file("spiga", srv.url, "w.pt", tmp_path / "out2", tmp_path / "cache")
        assert other.note.startswith("unpinned")
    finally:
        srv.close()
