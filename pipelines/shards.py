"""A resumable sharded map: items in, a batch function applied, results written shard by shard.

* Items are cut into fixed shards of ``shard_size`` in the order given; shard ``k`` is written as
  ``shard-{k:05d}.parquet`` atomically (temporary file, then rename), so a killed run (``kill -9``
  included) leaves only whole shards behind.
* On a rerun, shards already on disk are skipped; a ``_manifest.json`` holds a fingerprint of the
  items and the configuration, and shards made under another fingerprint are discarded, never mixed.
* ``load`` runs per item (in ``DataLoader`` workers when ``num_workers > 0``, so decoding overlaps the
  model); it returns a sample dict or a :class:`Failure`. ``infer`` runs per batch of good samples and
  returns one result dict (or :class:`Failure`) per sample. Failures are rows too, with a reason.
* Under ``accelerate launch`` shard ``k`` belongs to process ``k % num_processes``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipelines.reports import read_json, write_json, write_report

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
STATUS_FIELDS = [pa.field("id", pa.string()), pa.field("ok", pa.bool_()), pa.field("error", pa.string()),
                 pa.field("detail", pa.string())]


@dataclass(frozen=True)
class Failure:
    """An item that could not be processed: ``reason`` is a short stable code, ``detail`` free text."""

    reason: str
    detail: str = ""


@dataclass
class MapResult:
    """What one run of :meth:`ShardedMap.run` did, for the stage's report."""

    num_items: int
    num_shards: int
    shards_reused: int
    items_processed: int  # in this run (not counting reused shards)
    seconds: float
    failures: Counter = field(default_factory=Counter)  # reason -> count, this run only

    @property
    def items_per_second(self) -> float | None:
        return self.items_processed / self.seconds if self.items_processed and self.seconds > 0 else None


def fingerprint(ids: Sequence[str], config: dict) -> str:
    """Hash of the item ids (in order) and a JSON-able configuration."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode())
        h.update(b"\0")
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()


class _LoadDataset(Dataset):
    def __init__(self, items: Sequence[Any], load: Callable[[Any], Any]):
        self.items, self.load = items, load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        try:
            return i, self.load(self.items[i])
        except Exception as exc:  # a bad item must never end the run
            return i, Failure("load_error", f"{type(exc).__name__}: {exc}")


def _collate(batch: list) -> list:
    return batch


class ShardedMap:
    """Map ``load``/``infer`` over items into parquet shards under ``out_dir``, resumably."""

    def __init__(self, out_dir: str | Path, result_schema: pa.Schema, shard_size: int = 1000):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.schema = pa.schema(STATUS_FIELDS + list(result_schema))
        self.result_names = [f.name for f in result_schema]
        self.shard_size = shard_size

    def shard_path(self, k: int) -> Path:
        return self.out_dir / f"shard-{k:05d}.parquet"

    def _prepare(self, ids: list[str], config: dict, is_main: bool) -> None:
        """Discard shards made under another fingerprint, then record the current one."""
        fp = fingerprint(ids, {"config": config, "shard_size": self.shard_size})
        manifest = self.out_dir / MANIFEST
        if not is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        old = json.loads(manifest.read_text()).get("fingerprint") if manifest.is_file() else None
        if old != fp:
            stale = sorted(self.out_dir.glob("shard-*.parquet"))
            if stale:
                log.warning("%s: %d shards were made with other items or settings; discarding them", self.out_dir, len(stale))
            for p in stale:
                p.unlink()
        for p in self.out_dir.glob(".tmp-*"):  # leftovers of a killed write
            p.unlink()
        manifest.write_text(json.dumps({"fingerprint": fp, "num_items": len(ids), "shard_size": self.shard_size,
                                        "num_shards": -(-len(ids) // self.shard_size)}, indent=2))

    def _write(self, k: int, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=self.schema)
        tmp = self.out_dir / f".tmp-{os.getpid()}-shard-{k:05d}.parquet"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.shard_path(k))

    def run(
        self,
        items: Sequence[Any],
        ids: Sequence[str],
        load: Callable[[Any], dict | Failure],
        infer: Callable[[list[dict]], list[dict | Failure]],
        config: dict,
        batch_size: int = 16,
        num_workers: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
        desc: str = "map",
        wait: Callable[[], None] = lambda: None,
    ) -> MapResult:
        """Process every item whose shard is not on disk yet; return what was done.

        ``config`` is anything that changes the results (model revision, precision, options): a change
        invalidates existing shards. ``wait`` is the barrier between processes (``Runtime.wait_for_everyone``).
        """
        if len(items) != len(ids):
            raise ValueError(f"{len(items)} items but {len(ids)} ids")
        if len(set(ids)) != len(ids):
            raise ValueError("item ids must be unique")
        ids = list(ids)
        self._prepare(ids, config, process_index == 0)
        wait()
        n_shards = -(-len(ids) // self.shard_size)
        mine = [k for k in range(n_shards) if k % num_processes == process_index]
        pending = [k for k in mine if not self.shard_path(k).is_file()]
        reused = len(mine) - len(pending)
        order = [i for k in pending for i in range(k * self.shard_size, min((k + 1) * self.shard_size, len(ids)))]
        result = MapResult(num_items=len(ids), num_shards=n_shards, shards_reused=reused, items_processed=0, seconds=0.0)
        if not order:
            wait()
            return result
        loader = DataLoader(_LoadDataset([items[i] for i in order], load), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=_collate,
                            persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
                            pin_memory=False)
        buffers: dict[int, list[dict]] = {}
        rank = {i: n for n, i in enumerate(ids)}
        start = time.perf_counter()
        with tqdm(total=len(order), desc=desc, unit="item", disable=process_index != 0) as bar:
            for batch in loader:
                positions = [order[j] for j, _ in batch]
                samples = [s for _, s in batch]
                good = [(p, s) for p, s in zip(positions, samples, strict=True) if not isinstance(s, Failure)]
                outputs: list[dict | Failure] = infer([s for _, s in good]) if good else []
                if len(outputs) != len(good):
                    raise RuntimeError(f"infer returned {len(outputs)} results for {len(good)} samples")
                by_pos = dict(zip([p for p, _ in good], outputs, strict=True))
                for p, s in zip(positions, samples, strict=True):
                    out = s if isinstance(s, Failure) else by_pos[p]
                    row: dict[str, Any] = {"id": ids[p], "ok": not isinstance(out, Failure), "error": None, "detail": None}
                    if isinstance(out, Failure):
                        row.update(error=out.reason, detail=out.detail)
                        result.failures[out.reason] += 1
                    else:
                        missing = set(self.result_names) - set(out)
                        if missing:
                            raise RuntimeError(f"infer result lacks {sorted(missing)}")
                        row.update({k: out[k] for k in self.result_names})
                    k = p // self.shard_size
                    buffers.setdefault(k, []).append(row)
                    expected = min((k + 1) * self.shard_size, len(ids)) - k * self.shard_size
                    if len(buffers[k]) == expected:
                        self._write(k, sorted(buffers.pop(k), key=lambda r: rank[r["id"]]))
                result.items_processed += len(batch)
                bar.update(len(batch))
        if buffers:
            raise RuntimeError(f"shards {sorted(buffers)} were left incomplete")
        result.seconds = time.perf_counter() - start
        wait()
        return result


def read_shards(out_dir: str | Path) -> pa.Table:
    """All shards under ``out_dir`` as one table in item order; fails when any shard is missing."""
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} is missing: {out_dir} is not the output of a sharded stage")
    n = json.loads(manifest.read_text())["num_shards"]
    missing = [k for k in range(n) if not (out_dir / f"shard-{k:05d}.parquet").is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} are missing; rerun the stage")
    tables = [pq.read_table(out_dir / f"shard-{k:05d}.parquet") for k in range(n)]
    return pa.concat_tables(tables) if tables else pa.table({})


def to_tensor_batch(arrays: list) -> torch.Tensor:
    """Stack per-sample numpy arrays into one contiguous tensor (pinned when CUDA is present)."""
    t = torch.from_numpy(np.stack(arrays))
    return t.pin_memory() if torch.cuda.is_available() else t


SUMMARY = "summary.json"


def count_rows(out_dir: str | Path) -> dict:
    """Rows, ok and failed (by reason) over all shards of ``out_dir``."""
    table = read_shards(out_dir)
    ok = table.column("ok").to_pylist() if table.num_rows else []
    errors = table.column("error").to_pylist() if table.num_rows else []
    failed = Counter(e for good, e in zip(ok, errors, strict=True) if not good)
    return {"rows": len(ok), "ok": int(sum(ok)), "failed": int(sum(failed.values())),
            "failed_by_reason": dict(sorted(failed.items()))}


def read_summary(out_dir: str | Path) -> dict:
    """The ``summary.json`` of a sharded stage's output (empty when there is none)."""
    path = Path(out_dir) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else {}


def write_summary(out_dir: str | Path, result: MapResult, *, model: dict | None, runtime: dict,
                  config: dict, num_processes: int = 1, run_report: str | Path | None = None) -> dict:
    """Write the one summary format of every sharded stage, ``summary.json`` beside the shards, and, when
    ``run_report`` is given, that run's figures there (a metrics file, :func:`~pipelines.reports.write_report`).

    The summary is part of the stage's data output, so it holds only what the inputs decide (model,
    runtime, configuration, counts over all shards): two runs on the same inputs write the same bytes.
    What this run did (items processed, shards reused) and its wall-clock throughput go to ``run_report``;
    ``throughput`` is that of the last run that processed items: a rerun that only reused shards keeps the
    previous report's figure rather than reporting none. Returns the summary plus ``this_run`` and
    ``throughput`` (the run report's figures) for the stage's log.
    """
    summary = {
        "model": model,
        "uses_standin_model": bool(model and model.get("standin")),
        "runtime": runtime,
        "config": config,
        "counts": count_rows(out_dir),
    }
    write_json(Path(out_dir) / SUMMARY, summary)
    previous = None
    if run_report is not None and Path(run_report).is_file():
        previous = read_json(run_report).get("throughput")
    if result.items_processed:
        throughput = {"items_per_second": result.items_per_second, "items": result.items_processed,
                      "seconds": result.seconds}
    else:
        throughput = previous
    this_run = {"items_processed": result.items_processed, "shards_reused": result.shards_reused,
                "num_shards": result.num_shards, "failed": int(sum(result.failures.values()))}
    if run_report is not None:
        write_report(run_report, {"throughput": throughput, "this_run": this_run,
                                  "uses_standin_models": summary["uses_standin_model"]},
                     {"output": Path(out_dir).as_posix(), "model": model, "runtime": runtime,
                      "throughput_scope": "main process" if num_processes > 1 else "all processes",
                      "failures_this_run": dict(sorted(result.failures.items()))})
    return {**summary, "this_run": this_run, "throughput": throughput}
