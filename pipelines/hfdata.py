"""Writing a Hugging Face dataset as parquet shards in the Hub layout, plus its dataset card.

The layout ``data/{split}-{i:05d}-of-{n:05d}.parquet`` + ``README.md`` (YAML front matter with
``configs`` and ``dataset_info``) is what ``datasets.load_dataset(<dir>)`` reads with no loading script,
and what ``push_to_hub`` makes; diffusers' ``train_controlnet.py --dataset_name=<dir>`` reads it the
same way. Each parquet file carries the ``huggingface`` schema metadata, so Image columns decode to PIL.

Each dataset defines its columns once, as a :class:`DatasetSchema` next to its builder; every set that holds
out rows by id uses :func:`hash_split` (a set with an official split, COCO's train2017/val2017, keeps it).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from datasets.arrow_writer import TypedSequence

DATA_DIR = "data"
CARD = "README.md"


@dataclass(frozen=True)
class DatasetSchema:
    """One dataset's columns, defined once next to its builder: the ``features`` every row is written with and a
    one-line description per column (the card's "Columns" section: :meth:`columns_markdown`)."""

    features: datasets.Features
    descriptions: Mapping[str, str]

    def __post_init__(self) -> None:
        missing = [c for c in self.features if c not in self.descriptions]
        extra = [c for c in self.descriptions if c not in self.features]
        if missing or extra:
            raise ValueError(f"schema descriptions: missing {missing}, not columns {extra}")

    def columns_markdown(self) -> list[str]:
        """``- `column`: description`` per column, in the features' order."""
        return [f"- `{c}`: {self.descriptions[c]}" for c in self.features]


def _hash_rank(id: str) -> tuple[str, str]:
    """The sort key of :func:`hash_split`: ``(sha1(id) hex digest, id)``, the same on every machine and run."""
    return hashlib.sha1(id.encode()).hexdigest(), id


def hash_split(ids: Iterable[str], validation_count: int) -> dict[str, str]:
    """id -> split: the ``validation_count`` ids with the smallest ``_hash_rank`` are ``validation``, the rest
    ``train`` (:func:`hash_split_rule` says so in words). Independent of the ids' order; rows sharing an id share
    a split."""
    if validation_count < 0:
        raise ValueError(f"validation_count must be >= 0, got {validation_count}")
    unique = list(dict.fromkeys(ids))
    held = set(sorted(unique, key=_hash_rank)[:validation_count])
    return {i: ("validation" if i in held else "train") for i in unique}


def hash_split_rule(validation_rows: int) -> str:
    """The card's sentence for :func:`hash_split` with ``validation_rows`` ids held out."""
    ids = "id" if validation_rows == 1 else "ids"
    return (f"`validation` holds the {validation_rows} {ids} with the smallest sha1(id) hex digest, "
            "`train` the rest: the shared hash rule (`pipelines.hfdata.hash_split`), the same on every machine and "
            "independent of row order.")


class ParquetShardWriter:
    """Write rows of one split as ``data/{split}-{i:05d}-of-{n:05d}.parquet`` under ``out_dir``.

    Rows are encoded with ``features.encode_example`` (images become PNG bytes: give numpy arrays,
    PIL images, paths or ``{'bytes': ..., 'path': None}``), buffered, and written ``rows_per_file`` at a
    time to temporary names; :meth:`close` renames them once the file count ``n`` is known. A writer
    that fails inside ``with`` removes its temporary files and renames nothing.
    """

    def __init__(self, out_dir: str | Path, split: str, features: datasets.Features, rows_per_file: int = 1000,
                 row_group_size: int = 100):
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
        if not split or "-" in split or "/" in split:
            raise ValueError(f"split name {split!r} must be non-empty without '-' or '/'")
        self.out_dir = Path(out_dir)
        self.split, self.features = split, features
        self.rows_per_file, self.row_group_size = rows_per_file, max(1, row_group_size)
        self.schema: pa.Schema = features.arrow_schema
        self.rows_written = 0
        self.num_bytes = 0  # Arrow bytes of the rows written (the card's dataset_info num_bytes)
        self.files: list[Path] = []
        self._tmp: list[Path] = []
        self._buffer: list[dict] = []
        self._closed = False
        (self.out_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> ParquetShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, row: dict) -> None:
        """Encode and buffer one row; a full buffer is written as one file."""
        if self._closed:
            raise RuntimeError("writer is closed")
        missing = set(self.features) - set(row)
        if missing:
            raise ValueError(f"row lacks column(s) {sorted(missing)}")
        self._buffer.append(self.features.encode_example({k: row[k] for k in self.features}))
        if len(self._buffer) >= self.rows_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        # datasets' own typed conversion: it builds the Array2D extension arrays and checks the types
        columns = [pa.array(TypedSequence([r[name] for r in self._buffer], type=feature))
                   for name, feature in self.features.items()]
        table = pa.Table.from_arrays(columns, schema=self.schema)
        tmp = self.out_dir / DATA_DIR / f".tmp-{os.getpid()}-{self.split}-{len(self._tmp):05d}.parquet"
        pq.write_table(table, tmp, row_group_size=self.row_group_size)
        self._tmp.append(tmp)
        self.rows_written += len(self._buffer)
        self.num_bytes += table.nbytes
        self._buffer = []

    def close(self) -> list[Path]:
        """Write what is buffered, give every file its final name, and return the files."""
        if self._closed:
            return self.files
        self._flush()
        n = len(self._tmp)
        for i, tmp in enumerate(self._tmp):
            final = self.out_dir / DATA_DIR / f"{self.split}-{i:05d}-of-{n:05d}.parquet"
            os.replace(tmp, final)
            self.files.append(final)
        self._closed = True
        return self.files

    def abort(self) -> None:
        """Drop buffered rows and temporary files."""
        for tmp in self._tmp:
            tmp.unlink(missing_ok=True)
        self._tmp, self._buffer, self._closed = [], [], True


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` tag for ``n`` examples (``n<1K``, ``1K<n<10K``, ... ``n>1T``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    bounds = [(10**3, "1K"), (10**4, "10K"), (10**5, "100K"), (10**6, "1M"), (10**7, "10M"), (10**8, "100M"),
              (10**9, "1B"), (10**10, "10B"), (10**11, "100B"), (10**12, "1T")]
    if n < bounds[0][0]:
        return "n<1K"
    for (lo, lo_name), (hi, hi_name) in zip(bounds, bounds[1:], strict=False):
        if lo <= n < hi:
            return f"{lo_name}<n<{hi_name}"
    return "n>1T"


def card_metadata(*, pretty_name: str, features: datasets.Features, splits: dict[str, int], license: str,
                  source_datasets: list[str], task_categories: list[str], tags: list[str] | None = None,
                  size_categories: str | None = None, split_bytes: dict[str, int] | None = None) -> dict:
    """The YAML front matter of the card, as a dict (see :func:`write_card`)."""
    total = sum(splits.values())
    info_splits = []
    for s, n in splits.items():
        entry: dict[str, Any] = {"name": s}
        if split_bytes is not None:
            entry["num_bytes"] = int(split_bytes[s])
        entry["num_examples"] = int(n)
        info_splits.append(entry)
    info: dict[str, Any] = {"features": features._to_yaml_list(), "splits": info_splits}
    if split_bytes is not None:
        info["dataset_size"] = int(sum(split_bytes[s] for s in splits))
    return {
        "pretty_name": pretty_name,
        "license": license,
        "task_categories": list(task_categories),
        "source_datasets": list(source_datasets),
        "size_categories": [size_categories or size_category(total)],
        "tags": list(tags or []),
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": f"{DATA_DIR}/{s}-*"} for s in splits]}],
        "dataset_info": info,
    }


def write_card(out_dir: str | Path, *, pretty_name: str, features: datasets.Features, splits: dict[str, int],
               license: str, source_datasets: list[str], task_categories: list[str], body_markdown: str,
               tags: list[str] | None = None, size_categories: str | None = None,
               split_bytes: dict[str, int] | None = None) -> Path:
    """Write ``README.md``: YAML front matter (configs, dataset_info, license, ...) then ``body_markdown``.

    ``splits`` maps split name to example count; ``split_bytes`` (Arrow bytes per split, e.g.
    :attr:`ParquetShardWriter.num_bytes`) completes ``dataset_info.splits`` so ``datasets`` uses it
    without a warning. ``size_categories`` defaults to :func:`size_category` of the total count.
    """
    meta = card_metadata(pretty_name=pretty_name, features=features, splits=splits, license=license,
                         source_datasets=source_datasets, task_categories=task_categories, tags=tags,
                         size_categories=size_categories, split_bytes=split_bytes)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    path = Path(out_dir) / CARD
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"---\n{front}---\n\n{body_markdown.strip()}\n")
    return path


def read_card_metadata(path: str | Path) -> dict:
    """Parse the YAML front matter of a card written by :func:`write_card`."""
    text = Path(path).read_text()
    if not text.startswith("---\n"):
        raise ValueError(f"{path} has no YAML front matter")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]) or {}


def files_key(dataset_dir: str | Path) -> str:
    """A key that changes whenever any file under ``dataset_dir`` does: sha256 over each file's relative path,
    size and mtime (ns). Cheap (one ``stat`` per file, no reads)."""
    root = Path(dataset_dir)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_local_split(dataset_dir: str | Path, split: str, cache_dir: str | Path | None = None) -> Any:
    """``datasets.load_dataset(<dataset_dir>, split=split)`` that never returns stale rows.

    ``datasets`` caches a local folder's Arrow conversion under a key that survives a rewrite of the folder
    (a rebuilt dataset whose card holds ``dataset_info`` came back with the old rows), so every load of a local
    dataset goes through here, into a cache folder named by :func:`files_key`: a rebuilt dataset gets a fresh
    cache, an unchanged one reuses its own. ``cache_dir`` (default: datasets' cache) holds those folders."""
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "data").is_dir():
        raise FileNotFoundError(f"{dataset_dir} holds no dataset (no data/ folder): run the assemble stage first")
    root = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
    return datasets.load_dataset(str(dataset_dir), split=split,
                                 cache_dir=str(root / "facecontrol-local" / files_key(dataset_dir)[:20]))


def load_split_sorted(dataset_dir: str | Path, split: str, columns: list[str], limit: int | None = None,
                      cache_dir: str | Path | None = None) -> Any:
    """``split`` of the Hub-layout dataset at ``dataset_dir`` with ``columns``, sorted by ``id``, the first
    ``limit`` rows (all when None): the order every consumer of a split (generate, evaluate, training
    validation, reference statistics) shares. Images decode lazily, per row."""
    ds = load_local_split(dataset_dir, split, cache_dir).select_columns(columns)
    order = sorted(range(len(ds)), key=ds["id"].__getitem__)
    return ds.select(order if limit is None else order[:limit])
