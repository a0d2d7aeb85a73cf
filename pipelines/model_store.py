"""Getting model weights into a local folder with a manifest: real downloads and stand-ins alike.

Every consumer (annotate, caption, bench, later evaluate) loads from the local folder and reads the
manifest to report which model it used and whether it was real.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipelines.digests import is_torchscript, tree_digest
from pipelines.reports import ModelInfo, write_model_manifest
from pipelines.standins import STANDIN_NOTE
from pipelines.standins.registry import build_standin

log = logging.getLogger(__name__)


def _fresh(dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    return dest


def make_standin(role: str, dest: str | Path, seed: int = 0) -> ModelInfo:
    """Build the stand-in for ``role`` into ``dest`` and write its manifest."""
    dest = _fresh(Path(dest))
    model_id, _ = build_standin(role, dest, seed)
    info = ModelInfo(name=role, id=model_id, revision=tree_digest(dest),
                     source=f"built by code (pipelines.standins, seed={seed})", standin=True, note=STANDIN_NOTE)
    write_model_manifest(dest, info)
    return info


def fetch_weights_file(role: str, url: str, file_name: str, dest: str | Path, cache_dir: str | Path,
                       sha256: str | None = None) -> ModelInfo:
    """Download a single weights file (resumable, into ``cache_dir``), copy it into ``dest``, write the manifest.

    A TorchScript file is executable code (``torch.jit.load`` runs it): without a pinned ``sha256`` it stays in
    the cache and :class:`DownloadError` gives its measured sha256 to check and pin. Other files without a pin
    are installed and their manifest note says ``unpinned``."""
    from pipelines.sources.downloads import DownloadError, download

    result = download(url, Path(cache_dir) / file_name, sha256=sha256)
    if sha256 is None and is_torchscript(result.path):
        raise DownloadError(f"{url}: {file_name} is TorchScript (executable code: torch.jit.load runs it) and model "
                            f"{role!r} pins no sha256; the downloaded file's sha256 is {result.sha256}: check it "
                            f"against a trusted source and set sha256: {result.sha256} for {role!r} in params.yaml")
    dest = _fresh(Path(dest))
    shutil.copyfile(result.path, dest / file_name)
    note = ("sha256 pinned in params and verified" if sha256 else
            "unpinned: sha256 measured at download, not checked against a pin (size and server MD5 only)")
    info = ModelInfo(name=role, id=file_name, revision=result.sha256, source=url, standin=False, note=note)
    write_model_manifest(dest, info)
    return info


DEFAULT_HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model"]


def link_tree(src: str | Path, dest: str | Path, skip: tuple[str, ...] = (".cache",)) -> None:
    """Mirror the files under ``src`` into ``dest`` as hard links (copies across file systems), leaving out the
    top-level names in ``skip``."""
    import os

    src, dest = Path(src), Path(dest)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in skip or not path.is_file():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)


def fetch_hub_snapshot(role: str, repo_id: str, revision: str, dest: str | Path,
                       cache_dir: str | Path, allow_patterns: list[str] | None = None) -> ModelInfo:
    """Resolve ``revision`` to a commit, get that snapshot, lay it into ``dest``, write the manifest.

    The snapshot is kept in ``cache_dir/hub/<repo>/<commit>/`` (outside the DVC output, which
    DVC deletes before a stage re-runs) and ``dest`` gets hard links to it: a rerun of the same commit downloads
    nothing again, and an interrupted download resumes. A ``revision`` that is a branch is resolved at every run;
    the commit it gave is the manifest's ``revision`` (pin a commit in params to freeze it)."""
    from huggingface_hub import HfApi, snapshot_download

    from pipelines.sources.downloads import DownloadError

    try:
        commit = HfApi().model_info(repo_id, revision=revision).sha
    except Exception as exc:  # offline, unknown repo or revision, gated, no network: say which model
        raise DownloadError(f"{repo_id}@{revision}: cannot resolve the revision on the Hugging Face Hub "
                            f"({type(exc).__name__}: {exc})") from exc
    if commit != revision:
        log.warning("%s: revision %r is a branch or tag, resolved to commit %s now (recorded in the manifest); "
                    "pin that commit in params to freeze it", repo_id, revision, commit)
    local = Path(cache_dir) / "hub" / repo_id.replace("/", "--") / commit
    snapshot_download(repo_id, revision=commit, local_dir=local, allow_patterns=allow_patterns or DEFAULT_HUB_PATTERNS)
    dest = _fresh(Path(dest))
    link_tree(local, dest)
    info = ModelInfo(name=role, id=repo_id, revision=commit, source=f"https://huggingface.co/{repo_id}", standin=False)
    write_model_manifest(dest, info)
    return info
