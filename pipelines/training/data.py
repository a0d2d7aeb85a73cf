"""Training data from a Hub-layout dataset folder: named columns checked against the dataset, rows seen
through a transform, caption columns that hold one string or a list of them, the data's identity."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.digests import tree_digest
from pipelines.errors import PipelineError


class MissingColumn(PipelineError):
    """A column a trainer was told to read is not in the dataset."""


def check_columns(column_names: Sequence[str], columns: Mapping[str, str], where: str) -> None:
    """Raise :class:`MissingColumn` naming each argument (``image_column``...) whose column is not in
    ``column_names`` (the columns of ``where``)."""
    missing = [f"{col!r} ({arg})" for arg, col in columns.items() if col not in column_names]
    if missing:
        raise MissingColumn(f"{where} has no column {', '.join(missing)}; its columns: {', '.join(column_names)}")


def load_rows(dataset_dir: str | Path, split: str, columns: Mapping[str, str],
              cache_dir: str | Path | None = None) -> Any:
    """The ``split`` of the dataset at ``dataset_dir`` with only ``columns`` (argument name -> column name),
    each checked to exist (diffusers' ``--image_column`` convention)."""
    from pipelines.hfdata import load_local_split

    ds = load_local_split(dataset_dir, split, cache_dir)
    check_columns(ds.column_names, columns, f"{dataset_dir} (split {split})")
    return ds.select_columns(list(dict.fromkeys(columns.values())))


def caption_options(value: str | Sequence[str]) -> list[str]:
    """A caption cell as its list of options: one string, or the list a column holds (COCO: five per image)."""
    options = [value] if isinstance(value, str) else list(value)
    if not options:
        raise ValueError("a caption cell holds an empty list")
    return options


def first_caption(value: str | Sequence[str]) -> str:
    """The caption validation uses: the string, or the first of a list."""
    return caption_options(value)[0]


def pick_captions(ids: torch.Tensor | Sequence[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """One token-id row per sample: ``(B, L)`` ids (a string column) as they are; else, per sample, one of
    its ``(K, L)`` options drawn with ``generator`` (the micro-step's, so a resumed run draws the same)."""
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return ids
    return torch.stack([opts[int(torch.randint(len(opts), (1,), generator=generator))] for opts in ids])


class TransformedRows(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` seen through a per-row transform (for a torch ``DataLoader``)."""

    def __init__(self, ds: Any, transform: Callable[[dict], dict]):
        self.ds, self.transform = ds, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.transform(self.ds[int(i)])


def dataset_digest(dataset_dir: str | Path) -> str:
    """The training data's identity: :func:`~pipelines.digests.tree_digest` of the dataset folder (every
    file's relative path and bytes: each split's parquet shards and the card), so other rows, another
    train/validation split or re-encoded images give another digest. It reads the whole folder once (the 100K
    set, some 40 GB: tens of seconds, against hours of training)."""
    return tree_digest(dataset_dir)
