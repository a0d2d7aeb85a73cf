"""Publishing a dataset under data/datasets/ to the Hugging Face Hub: staged, checked, then uploaded.

The flow, in order (nothing touches the Hub before the checks pass):

1. :func:`build_staging` makes the exact tree that will be uploaded, in a local folder: the parquet
   files (hard links when possible, so a 31 GB set is not copied), the card ``README.md`` completed with
   what a Hub reader needs (source licenses and terms, provenance from the pipeline's report, how to
   ``load_dataset`` it from the Hub and train on it, a sample grid image rendered from the rows
   themselves), and that image. :func:`staging_folder` checks the tree: every parquet name follows
   ``data/{split}-NNNNN-of-NNNNN.parquet`` with no file of a split missing, the card's splits and
   ``num_examples`` match the files' row counts, and the card's features match the files' own
   ``huggingface`` schema metadata.
2. :func:`preflight` checks, in this order, that the repo id is well formed, a token is there, the Hub
   answers (``whoami``: network and token), the token may write, and the repo exists or its namespace is
   the user's or one of their organisations. Any failure is a :class:`PublishError` naming the problem.
3. :func:`publish` creates the repo (``exist_ok``) and the branch when needed, then uploads the folder in
   one call. With ``huggingface_hub`` >= 1.x and ``hf_xet`` (installed here), ``HfApi.upload_folder`` is
   itself the resumable large-folder path: it commits in batches, and re-running the same call skips
   files already committed and re-sends no chunk the Hub already has. ``large=True`` uses
   ``HfApi.upload_large_folder`` where the installed client still has it (older versions; it keeps its own
   cache of finished files under ``<staging>/.cache/huggingface``, so the staging folder is kept between
   runs); that API cannot open a pull request and has no commit id to return, so ``create_pr`` with it
   is refused and the commit id is read back with ``repo_info``.

The caller (stages/publish.py) records the commit id in ``reports/publish/<dataset>.json``.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
import yaml

from pipelines.digests import sha256_file
from pipelines.errors import PipelineError
from pipelines.hfdata import CARD, DATA_DIR, read_card_metadata

SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_.]+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.parquet$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
GRID_NAME = "sample_grid.png"
DEFAULT_ENDPOINT = "https://huggingface.co"
STAGING_CACHE = ".cache"  # upload_large_folder's record of finished files: kept when the staging is rebuilt

# What each source's license says, for the card's metadata and its "Source licenses and terms" block.
# Keyed by the ids in the card's ``source_datasets``.
SOURCE_TERMS: dict[str, dict[str, str]] = {
    "microsoft/FaceSynthetics": {
        "license_name": "facesynthetics-license",
        "license_link": "https://github.com/microsoft/FaceSynthetics/blob/main/LICENSE.txt",
        "text": "Microsoft's FaceSynthetics license (LICENSE.txt in microsoft/FaceSynthetics); its terms apply to "
                "every row, each derived from one of those images.",
    },
    "detection-datasets/coco": {
        "license_name": "cc-by-4.0",
        "license_link": "https://cocodataset.org/#termsofuse",
        "text": "COCO annotations: CC BY 4.0 (the COCO Consortium). Images: the Flickr license of each "
                "image (the `license` field of COCO's image entries); COCO's terms of use apply.",
    },
}
MODEL_TERMS = {
    "spiga": "SPIGA weights: BSD-3-Clause (andresprados/SPIGA); landmarks are model outputs.",
    "blip": "BLIP captioner (Salesforce/blip-image-captioning-large): BSD-3-Clause; captions are model outputs.",
}


class PublishError(PipelineError):
    """A publish that cannot or did not go through; the message names the problem and what to do."""


@dataclass(frozen=True)
class StagedFile:
    """One file of the staged tree: its path in the repo and its size."""

    path: str
    size: int


# ---------------------------------------------------------------------------------------------- checks

def check_repo_id(repo_id: str | None) -> str:
    """``namespace/name`` (the Hub's rules: letters, digits, ``-_.``, at most 96 characters each side)."""
    if not repo_id or not isinstance(repo_id, str):
        raise PublishError("no repo id: pass --repo-id namespace/name (or set publish.repo_id in params.yaml)")
    if not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith((".", "-")) \
            or any(part.endswith((".", "-")) for part in repo_id.split("/")):
        raise PublishError(f"repo id {repo_id!r} is not of the form namespace/name (letters, digits, '-', '_', '.'; "
                           f"no '--' or '..'; at most 96 characters each)")
    return repo_id


def check_shard_names(paths: list[str]) -> dict[str, int]:
    """Check that ``paths`` (relative to the dataset root) are exactly ``data/{split}-i-of-n.parquet``, every
    ``i`` in ``0..n-1`` present once per split; return ``{split: number of files}``."""
    seen: dict[str, dict[int, int]] = {}
    for p in paths:
        parent, _, name = p.rpartition("/")
        m = SHARD_NAME.match(name)
        if parent != DATA_DIR or not m:
            raise PublishError(f"{p}: not a Hub shard name; expected {DATA_DIR}/{{split}}-NNNNN-of-NNNNN.parquet "
                               f"(e.g. {DATA_DIR}/train-00000-of-00002.parquet)")
        count = int(m["count"])
        idx = seen.setdefault(m["split"], {})
        if int(m["index"]) >= count:
            raise PublishError(f"{p}: index {m['index']} is not below the file count {m['count']}")
        idx[int(m["index"])] = count
    out = {}
    for split, idx in seen.items():
        counts = set(idx.values())
        if len(counts) != 1:
            raise PublishError(f"split {split!r}: shards disagree on the file count ({sorted(counts)})")
        n = counts.pop()
        missing = sorted(set(range(n)) - set(idx))
        if missing:
            raise PublishError(f"split {split!r}: {len(missing)} of {n} shard(s) missing, e.g. "
                               f"{DATA_DIR}/{split}-{missing[0]:05d}-of-{n:05d}.parquet")
        out[split] = n
    if not out:
        raise PublishError(f"no {DATA_DIR}/*.parquet files to publish")
    return out


def _parquet_features(path: Path) -> datasets.Features | None:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"huggingface")
    if raw is None:
        return None
    return datasets.Features.from_dict(json.loads(raw)["info"]["features"])


def check_card_matches(card_meta: dict, root: Path, shard_paths: list[str]) -> dict[str, int]:
    """The card's configs, splits, ``num_examples`` and features against the parquet files; return rows per split."""
    rows: dict[str, int] = {}
    for p in shard_paths:
        split = SHARD_NAME.match(p.rpartition("/")[2])["split"]
        rows[split] = rows.get(split, 0) + pq.ParquetFile(root / p).metadata.num_rows
    info = card_meta.get("dataset_info") or {}
    card_splits = {s["name"]: s.get("num_examples") for s in info.get("splits") or []}
    if set(card_splits) != set(rows):
        raise PublishError(f"card splits {sorted(card_splits)} differ from the files' splits {sorted(rows)}")
    for s, n in rows.items():
        if card_splits[s] != n:
            raise PublishError(f"split {s!r}: the card says {card_splits[s]} examples, the files hold {n}")
    config_splits = {f["split"]: f["path"] for c in card_meta.get("configs") or [] for f in c.get("data_files") or []}
    for s in rows:
        if config_splits.get(s) != f"{DATA_DIR}/{s}-*":
            raise PublishError(f"card configs: split {s!r} should read {DATA_DIR}/{s}-*, got {config_splits.get(s)!r}")
    if "features" not in info:
        raise PublishError("card has no dataset_info.features")
    card_features = datasets.Features._from_yaml_list(info["features"])
    for p in shard_paths:
        file_features = _parquet_features(root / p)
        if file_features is not None and file_features != card_features:
            raise PublishError(f"{p}: the file's features differ from the card's "
                               f"({sorted(file_features)} vs {sorted(card_features)})")
    return rows


# --------------------------------------------------------------------------------------------- staging

def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        s, d = src.stat(), dst.stat()
        if (s.st_ino, s.st_dev) == (d.st_ino, d.st_dev) or (s.st_size, s.st_mtime_ns) == (d.st_size, d.st_mtime_ns):
            return  # the same file, or an unchanged copy
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def staging_folder(dataset_dir: str | Path, out_dir: str | Path,
                   extra_files: dict[str, bytes | str | Path] | None = None) -> list[Path]:
    """Build in ``out_dir`` the exact tree to upload and return its files (sorted, absolute).

    The tree is the dataset's ``data/*.parquet`` (hard-linked, copied where links are impossible) and its
    ``README.md``, plus ``extra_files`` (repo path -> bytes, text or a file to copy; a ``README.md`` entry
    replaces the card). Files of an earlier staging that are no longer part of the tree are removed;
    ``out_dir/.cache`` (upload_large_folder's resume record) is kept. Raises :class:`PublishError` when a
    parquet name is not ``data/{split}-NNNNN-of-NNNNN.parquet``, a shard is missing, or the card's splits,
    counts or features disagree with the files.
    """
    src, out = Path(dataset_dir), Path(out_dir)
    if not src.is_dir():
        raise PublishError(f"{src}: no such dataset folder (datasets live in data/datasets/<name>; run its "
                           f"assemble stage first)")
    if src.resolve() == out.resolve():
        raise PublishError("the staging folder must differ from the dataset folder")
    extra = dict(extra_files or {})
    if CARD not in extra and not (src / CARD).is_file():
        raise PublishError(f"{src / CARD}: the dataset has no card")
    stray = sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                   if p.is_file() and p.name != CARD and not (p.parent == src / DATA_DIR and p.suffix == ".parquet"))
    shards = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.parquet"))
    check_shard_names(shards)
    if stray:
        # temporary shards of a failed writer, stray files: nothing outside the layout is published silently
        bad = [s for s in stray if s.endswith(".parquet") or s.startswith(f"{DATA_DIR}/")]
        if bad:
            raise PublishError(f"{src}: {bad[0]} is not a Hub shard name; expected "
                               f"{DATA_DIR}/{{split}}-NNNNN-of-NNNNN.parquet")

    wanted: dict[str, Any] = {s: src / s for s in shards}
    wanted[CARD] = src / CARD
    wanted.update(extra)
    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(out.rglob("*"), reverse=True):
        rel = p.relative_to(out).as_posix()
        if rel == STAGING_CACHE or rel.startswith(STAGING_CACHE + "/"):
            continue
        if p.is_file() or p.is_symlink():
            if rel not in wanted:
                p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    for rel, content in wanted.items():
        dst = out / rel
        if isinstance(content, Path):
            _link_or_copy(content, dst)
            continue
        data = content.encode() if isinstance(content, str) else bytes(content)
        if dst.is_file() and dst.read_bytes() == data:
            continue  # unchanged: keep its mtime, so a resumed upload sees the same file
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            dst.unlink()  # it may be a hard link into the dataset: never write through it
        dst.write_bytes(data)

    check_card_matches(read_card_metadata(out / CARD), out, shards)
    return sorted(out / rel for rel in wanted)


def staged_tree(out_dir: str | Path, files: list[Path]) -> list[StagedFile]:
    """``files`` as repo paths with sizes, for the dry run and the report."""
    out = Path(out_dir)
    return [StagedFile(p.relative_to(out).as_posix(), p.stat().st_size) for p in files]


def format_tree(tree: list[StagedFile]) -> str:
    """The staged tree as the dry run prints it."""
    lines = [f"{f.size:>14,d}  {f.path}" for f in tree]
    lines.append(f"{sum(f.size for f in tree):>14,d}  total, {len(tree)} files")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ card extras

def _image_columns(card_meta: dict) -> list[str]:
    feats = (card_meta.get("dataset_info") or {}).get("features") or []
    return [f["name"] for f in feats if f.get("dtype") == "image"]


def sample_grid_png(dataset_dir: str | Path, card_meta: dict, rows: int = 4, cell: int = 160) -> bytes | None:
    """A PNG grid of the first ``rows`` rows of the validation split (else the first split): one row per
    example, columns ``image`` then ``conditioning_image`` (else the other image columns, at most two).
    ``None`` when the dataset has no ``image`` column."""
    from PIL import Image

    cols = _image_columns(card_meta)
    if "image" not in cols:
        return None
    others = ["conditioning_image"] if "conditioning_image" in cols else [c for c in cols if c != "image"][:2]
    cols = ["image", *others]
    root = Path(dataset_dir) / DATA_DIR
    files = sorted(root.glob("validation-*.parquet")) or sorted(root.glob("*.parquet"))
    picked: list[dict] = []
    for f in files:
        table = pq.read_table(f, columns=cols)
        picked += table.slice(0, rows - len(picked)).to_pylist()
        if len(picked) >= rows:
            break
    if not picked:
        return None
    grid = Image.new("RGB", (cell * len(cols), cell * len(picked)), "white")
    for r, row in enumerate(picked):
        for c, name in enumerate(cols):
            value = row[name]
            if not value or not value.get("bytes"):
                continue
            im = Image.open(io.BytesIO(value["bytes"])).convert("RGB")
            im.thumbnail((cell, cell))
            grid.paste(im, (c * cell + (cell - im.width) // 2, r * cell + (cell - im.height) // 2))
    buf = io.BytesIO()
    grid.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def card_sections_from_report(report: dict, *, repo_id: str | None = None, revision: str = "main",
                              dataset_dir: str | None = None, card_meta: dict | None = None,
                              grid_name: str | None = None, include_training: bool = True) -> str:
    """Markdown sections the assemble cards lack, for a reader on the Hub: loading it from the Hub (and the
    train_controlnet.py flags that read it there), a sample grid, the source licenses and terms, and the
    provenance block of the pipeline's report (models with revisions, parameters, packages).

    ``report`` is the dataset's report (reports/datasets/<name>.json with its .provenance.json, as
    :func:`pipelines.reports.read_report` merges them: models, packages and params at the top; an older
    report's ``provenance`` block is read too; may be empty); ``card_meta`` the card's YAML (for the source
    ids and columns)."""
    meta = card_meta or {}
    prov = report.get("provenance") or {k: report[k] for k in ("models", "packages", "params") if report.get(k)}
    out: list[str] = []
    if grid_name:
        cols = _image_columns(meta)
        shown = ["image", "conditioning_image"] if "conditioning_image" in cols else \
            ["image", *[c for c in cols if c != "image"][:2]]
        out += ["## Sample", "", f"![sample rows: {' | '.join(shown)}]({grid_name})", "",
                f"First rows of the validation split, rendered from the parquet files themselves "
                f"(columns: {', '.join(f'`{c}`' for c in shown)}).", ""]
    if repo_id:
        rev = f', revision="{revision}"' if revision and revision != "main" else ""
        out += ["## Load it from the Hub", "", "```python", "from datasets import load_dataset", "",
                f'ds = load_dataset("{repo_id}"{rev})', "```", "",
                "Pin `revision=` to the commit id recorded in the publisher's `reports/publish/<dataset>.json` "
                "to load exactly this upload.", ""]
        flags = report.get("train_controlnet_flags")
        if flags and dataset_dir:
            flags = flags.replace(f"--dataset_name={dataset_dir}", f"--dataset_name={repo_id}")
        if flags and include_training:
            out += ["Train on it with diffusers' `train_controlnet.py`, which reads it unchanged:", "", "```bash",
                    "accelerate launch train_controlnet.py \\",
                    "  --pretrained_model_name_or_path=stabilityai/stable-diffusion-2-1-base \\",
                    f"  {flags}", "```", ""]
    sources = list(meta.get("source_datasets") or [])
    if sources or prov.get("models"):
        out += ["## Source licenses and terms", ""]
        for s in sources:
            terms = SOURCE_TERMS.get(s)
            out.append(f"- `{s}`: " + (f"{terms['text']} <{terms['license_link']}>" if terms else "see its card."))
        for name in sorted(prov.get("models") or {}):
            m = prov["models"][name]
            if m.get("standin"):
                out.append(f"- `{name}`: a stand-in built by code (random weights); no third-party terms.")
            elif name in MODEL_TERMS:
                out.append(f"- {MODEL_TERMS[name]}")
        out += ["", "Use of this dataset must respect every term above.", ""]
    if prov:
        out += ["## Provenance", ""]
        for name, m in sorted((prov.get("models") or {}).items()):
            out.append(f"- model `{name}`: `{m.get('id')}` at `{m.get('revision')}`"
                       + (" (stand-in, random weights)" if m.get("standin") else ""))
        if prov.get("packages"):
            out.append("- packages: " + ", ".join(f"{k} {v}" for k, v in sorted(prov["packages"].items())))
        if prov.get("params"):
            out += ["", "Parameters of the build:", "", "```yaml",
                    yaml.safe_dump(prov["params"], sort_keys=True).strip(), "```"]
        out.append("")
    return "\n".join(out).strip() + "\n" if out else ""


def hub_card(card_text: str, report: dict, *, repo_id: str | None, revision: str, dataset_dir: str,
             grid_name: str | None) -> str:
    """The card to upload: the dataset's own card, local paths replaced by the repo id, ``license_name`` /
    ``license_link`` added when the license is ``other``, and :func:`card_sections_from_report` appended
    (before the card's own ``## License`` section when there is one)."""
    if not card_text.startswith("---\n"):
        raise PublishError("the dataset card has no YAML front matter")
    end = card_text.index("\n---\n", 4)
    meta = yaml.safe_load(card_text[4:end]) or {}
    body = card_text[end + 5:]
    if meta.get("license") == "other" and "license_name" not in meta:
        for s in meta.get("source_datasets") or []:
            if s in SOURCE_TERMS:  # the Hub asks for license_name / license_link with license: other
                keys = list(meta)
                at = keys.index("license") + 1
                terms = {"license_name": SOURCE_TERMS[s]["license_name"], "license_link": SOURCE_TERMS[s]["license_link"]}
                meta = {**{k: meta[k] for k in keys[:at]}, **terms, **{k: meta[k] for k in keys[at:]}}
                break
    if repo_id:
        body = body.replace(f"--dataset_name={dataset_dir}", f"--dataset_name={repo_id}")
    extra = card_sections_from_report(report, repo_id=repo_id, revision=revision, dataset_dir=dataset_dir,
                                      card_meta=meta, grid_name=grid_name,
                                      include_training="train_controlnet.py" not in body)
    if extra:
        at = body.find("\n## License")
        body = body.rstrip() + "\n\n" + extra if at < 0 else body[:at].rstrip() + "\n\n" + extra + body[at:]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n{body.rstrip()}\n"


def build_staging(dataset_dir: str | Path, out_dir: str | Path, *, report: dict | None = None,
                  repo_id: str | None = None, revision: str = "main") -> list[Path]:
    """:func:`staging_folder` with the Hub card (:func:`hub_card`) and the sample grid image."""
    src = Path(dataset_dir)
    if not (src / CARD).is_file():
        raise PublishError(f"{src / CARD}: no such dataset card (run the dataset's assemble stage first)")
    meta = read_card_metadata(src / CARD)
    grid = sample_grid_png(src, meta)
    extra: dict[str, bytes | str | Path] = {}
    if grid is not None:
        extra[GRID_NAME] = grid
    extra[CARD] = hub_card((src / CARD).read_text(), report or {}, repo_id=repo_id, revision=revision,
                           dataset_dir=str(dataset_dir).rstrip("/"), grid_name=GRID_NAME if grid else None)
    return staging_folder(src, out_dir, extra)


# -------------------------------------------------------------------------------------------- the Hub

def endpoint() -> str:
    """The Hub endpoint, read when called (``HF_ENDPOINT``; huggingface_hub reads it only at import)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def resolve_token(token: str | None) -> str | None:
    """``token``, else ``HF_TOKEN``, else the token ``hf auth login`` stored."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def make_api(token: str | None = None):
    """An ``HfApi`` on :func:`endpoint`."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token, library_name="facecontrol")


def _status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


def _network_error(exc: BaseException, where: str) -> PublishError:
    return PublishError(f"cannot reach the Hub at {where} ({type(exc).__name__}: {exc}); check the network, "
                        f"HF_ENDPOINT, and that HF_HUB_OFFLINE is not set")


def preflight(api, repo_id: str, repo_type: str = "dataset", token: str | None = None) -> dict:
    """Check before any upload work that the publish can succeed; return what was learnt.

    Order: the repo id's form; a token (argument, ``HF_TOKEN`` or ``hf auth login``); offline mode; the Hub
    answers ``whoami`` (network, and the token is valid); the token may write (role ``write`` or a
    fine-grained token); the repo exists (and then it is the caller's, one of their organisations', or
    shared with them), or it does not and its namespace is one they may create in. Returns
    ``{user, namespaces, repo_exists, private, token_role, endpoint}``; raises :class:`PublishError`.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    check_repo_id(repo_id)
    token = resolve_token(token)
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token "
                           "(a token with write access to the target namespace)")
    where = getattr(api, "endpoint", None) or endpoint()
    if constants.HF_HUB_OFFLINE:
        raise PublishError(f"HF_HUB_OFFLINE is set: cannot reach the Hub at {where}; unset it to publish")
    try:
        me = api.whoami(token=token)
    except OfflineModeIsEnabled as exc:
        raise PublishError(f"HF_HUB_OFFLINE is set: cannot reach the Hub at {where}; unset it to publish") from exc
    except HfHubHTTPError as exc:
        if _status(exc) == 401:
            raise PublishError(f"the token was refused by {where} (401): it is invalid or expired; "
                               f"make a new one at {where}/settings/tokens") from exc
        raise PublishError(f"{where} answered whoami with an error: {exc}") from exc
    except Exception as exc:  # connection refused, DNS, TLS, timeout: the client's transport errors
        raise _network_error(exc, where) from exc
    user = me.get("name")
    namespaces = {user, *[o.get("name") for o in me.get("orgs") or []]} - {None}
    access = (me.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        raise PublishError(f"the token of {user!r} is read-only: make a write token at {where}/settings/tokens")
    namespace = repo_id.split("/")[0]
    try:
        info = api.repo_info(repo_id, repo_type=repo_type, token=token)
        exists, private = True, getattr(info, "private", None)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        if isinstance(exc, GatedRepoError):
            raise PublishError(f"{repo_id}: gated and not accessible to {user!r}") from exc
        exists, private = False, None
    except HfHubHTTPError as exc:
        raise PublishError(f"{where} answered repo_info({repo_id!r}) with an error: {exc}") from exc
    except Exception as exc:
        raise _network_error(exc, where) from exc
    if namespace not in namespaces and role != "fineGrained":
        what = "exists but belongs to" if exists else "does not exist and cannot be created in"
        raise PublishError(f"{repo_id} {what} namespace {namespace!r}, which is not {user!r}'s nor one of their "
                           f"organisations ({', '.join(sorted(namespaces)) or 'none'}): not writable with this token")
    return {"user": user, "namespaces": sorted(namespaces), "repo_exists": exists, "private": private,
            "token_role": role, "endpoint": where}


def publish(dataset_dir: str | Path, repo_id: str, revision: str = "main", private: bool = True,
            create_pr: bool = False, token: str | None = None, dry_run: bool = False, large: bool = False, *,
            staging_dir: str | Path | None = None, report: dict | None = None, api=None,
            commit_message: str | None = None) -> dict:
    """Stage ``dataset_dir``, check, and upload it to the dataset repo ``repo_id`` at ``revision``.

    ``private`` applies when the repo is created (an existing repo keeps its visibility); ``create_pr``
    opens a pull request against the default branch (``revision`` must then be ``main``; to resume an
    interrupted PR upload, run again with ``revision='refs/pr/N'``); ``large`` picks
    ``upload_large_folder`` where the client has it (see the module docstring). ``dry_run`` builds the
    staging folder and returns its tree without any Hub call or token.

    Returns ``{repo_id, revision, commit_id, commit_url, pr_url, files, bytes, card_sha256, method,
    staging_dir, dry_run, preflight}`` (``files``: ``[{path, size}]``). Raises :class:`PublishError`.
    """
    check_repo_id(repo_id)
    revision = revision or "main"
    if create_pr and revision != "main":
        raise PublishError(f"create_pr opens a pull request against the default branch: revision must be 'main', "
                           f"got {revision!r} (to resume a PR upload, pass revision='refs/pr/N' without create_pr)")
    src = Path(dataset_dir)
    staging = Path(staging_dir) if staging_dir is not None else Path("data/publish") / src.name
    files = build_staging(src, staging, report=report, repo_id=repo_id, revision=revision)
    tree = staged_tree(staging, files)
    result: dict[str, Any] = {
        "repo_id": repo_id, "revision": revision, "create_pr": bool(create_pr), "private": bool(private),
        "files": [{"path": f.path, "size": f.size} for f in tree], "bytes": sum(f.size for f in tree),
        "card_sha256": sha256_file(staging / CARD), "staging_dir": str(staging), "dry_run": bool(dry_run),
        "commit_id": None, "commit_url": None, "pr_url": None, "method": None, "preflight": None,
    }
    if dry_run:
        return result

    token = resolve_token(token)
    api = api if api is not None else make_api(token)
    from huggingface_hub.errors import HfHubHTTPError

    use_large = bool(large) and hasattr(api, "upload_large_folder")
    if use_large and create_pr:
        raise PublishError("upload_large_folder cannot open a pull request: drop --create-pr, or drop --large "
                           "(upload_folder is resumable in this huggingface_hub version)")
    result["preflight"] = preflight(api, repo_id, "dataset", token)
    where = result["preflight"]["endpoint"]
    try:
        if not result["preflight"]["repo_exists"]:
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True, token=token)
        if revision != "main" and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True, token=token)
    except HfHubHTTPError as exc:
        raise PublishError(f"cannot create {repo_id} (or its branch {revision!r}) at {where}: {exc}") from exc
    except Exception as exc:
        raise _network_error(exc, where) from exc

    message = commit_message or f"Upload {src.name} with facecontrol"
    try:
        if use_large:
            result["method"] = "upload_large_folder"
            api.upload_large_folder(repo_id=repo_id, folder_path=str(staging), repo_type="dataset",
                                    revision=revision, private=private)
            info = api.repo_info(repo_id, repo_type="dataset", revision=revision, token=token)
            result["commit_id"] = info.sha
            result["commit_url"] = f"{where}/datasets/{repo_id}/commit/{info.sha}"
        else:
            result["method"] = "upload_folder"
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(staging), repo_type="dataset",
                                       revision=None if create_pr else revision, create_pr=create_pr,
                                       commit_message=message, token=token,
                                       ignore_patterns=[f"{STAGING_CACHE}/**"])
            result["commit_id"] = commit.oid
            result["commit_url"] = getattr(commit, "commit_url", None)
            result["pr_url"] = getattr(commit, "pr_url", None)
            if result["pr_url"]:
                result["revision"] = getattr(commit, "pr_revision", None) or result["revision"]
    except HfHubHTTPError as exc:
        raise PublishError(f"upload to {repo_id}@{revision} at {where} failed: {exc}. Run the same command again: "
                           f"files already committed are not sent again") from exc
    except (PublishError, ValueError):
        raise
    except Exception as exc:
        raise PublishError(f"upload to {repo_id}@{revision} interrupted: cannot reach the Hub at {where} "
                           f"({type(exc).__name__}: {exc}). Run the same command again: files already committed "
                           f"are not sent again") from exc
    if not result["commit_id"]:
        raise PublishError(f"the Hub returned no commit id for {repo_id}@{revision}")
    return result
