"""A resumable sharded map: items in, a batch function applied, results written shard by shard.

* Items are cut into fixed shards of ``shard_size`` in the order given; shard ``k`` is written as
  ``shard-{k:05d}.parquet`` atomically (temporary file named with the writer's pid, then rename), so a killed
  run (``kill -9`` included) leaves only whole shards behind.
* ``load`` runs per item (in ``DataLoader`` workers when ``num_workers > 0``, so decoding overlaps the
  model); it returns a sample dict or a :class:`Failure`. ``infer`` runs per batch of good samples and
  returns one result dict (or :class:`Failure`) per sample. Failures are rows too, with a reason.
* Under ``accelerate launch`` shard ``k`` belongs to process ``k % num_processes``.

What a shard was made from: its parquet footer (schema metadata :data:`FOOTER_KEY`) holds the fingerprint of
the item ids and the configuration (:func:`fingerprint`) and, per row, the blake2b-128 digest of each file
that ``inputs(item)`` names (``null`` for a missing file), taken in the worker just before ``load`` reads
it. Only content goes into the output (no paths, sizes or times), so two runs on the same inputs write
the same bytes. Beside the output, in :func:`state_dir` (not data: never part of the DVC output), each
shard's ``stats`` file caches ``path -> [size, mtime_ns, digest]``.

Reuse: before any work the main process verifies every shard on disk: its footer reads, its row count,
columns and fingerprint match, and its ``id`` column (read alone) equals the expected ids; then each
input is ``stat``-ed and hashed only when size or mtime differ from the cache. A shard that fails a check
(zero-byte, truncated, other settings, an input replaced, fixed, deleted or added) is deleted with a
warning and made again; the others are reused. So ``touch`` recomputes nothing, and neither does
``dvc repro --force`` on unchanged inputs (intended: the result would be the same bytes); a changed file
recomputes its shard only. A change that keeps a file's size and mtime (to the nanosecond) is not seen.

Cost at 100K FaceSynthetics images (2 inputs per item for annotate, 1 for caption, ~30 GB of PNGs): while
processing, each input is read once more for its digest, from the page cache, in the workers (~30 s of
CPU over all workers, against hours of model time); a rerun costs 200K ``stat`` calls plus 100 footers
and ``id`` columns (seconds); a rerun whose stat cache is lost or whose raw files were checked out again
(new mtimes) hashes every input once (reading ~30 GB: minutes), then the cache holds again. The footers
add ~35 bytes per input per row (~7 MB over the output); the stat cache ~100 bytes per input (~20 MB).

One run at a time: the main process holds an exclusive lock (``lockf``) on ``lock`` in :func:`state_dir` for the
whole run (:func:`output_lock`; the stages hold it until their summary is written); a second run fails at
once with :class:`OutputBusyError` naming the folder and the holder's pid. ``summary.json`` describes the
shards: a run that will make any shard removes it first, so a killed run leaves no summary of the old state.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipelines.errors import PipelineError
from pipelines.reports import read_json, write_json, write_report

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
SUMMARY = "summary.json"
FOOTER_KEY = b"facecontrol.shard"  # the shard's schema metadata: {"fingerprint": ..., "inputs": [[digest, ...], ...]}
STATUS_FIELDS = [pa.field("id", pa.string()), pa.field("ok", pa.bool_()), pa.field("error", pa.string()),
                 pa.field("detail", pa.string())]
_SHARD_ERRORS = (OSError, pa.ArrowException, ValueError, KeyError, TypeError)  # what a damaged shard raises


class OutputBusyError(PipelineError):
    """Another run holds the output folder."""


class ShardError(PipelineError):
    """A shard on disk that cannot be read."""


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


def state_dir(out_dir: str | Path) -> Path:
    """Where a sharded output keeps what is not data (its lock, the inputs' stat cache): beside it, hidden."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.state"


_HELD: dict[Path, int] = {}  # resolved output folder -> the fd of the lock this process holds on it


@contextmanager
def output_lock(out_dir: str | Path, is_main: bool = True) -> Iterator[None]:
    """Hold the exclusive lock of ``out_dir``; raise :class:`OutputBusyError` at once when another process holds it.

    A POSIX record lock (``lockf``): owned by this process, not by the ``DataLoader`` workers it forks, and
    gone when it dies (``kill -9`` included). Nested use in one process holds it once; on non-main processes
    (which follow the main one through barriers) it does nothing.
    """
    key = Path(out_dir).resolve()
    if not is_main or key in _HELD:
        yield
        return
    path = state_dir(out_dir) / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise OutputBusyError(f"{out_dir} is in use by another run (pid {holder}): wait for it to end or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd
    try:
        yield
    finally:
        del _HELD[key]
        os.close(fd)  # releases the lock


def identify(path: str, known: dict[str, list]) -> list | None:
    """``[size, mtime_ns, digest]`` of the file ``path`` (None when it is missing or unreadable); the digest
    (blake2b-128 of the bytes) comes from ``known[path]`` when size and mtime match it, else is computed."""
    try:
        st = os.stat(path)
        hit = known.get(path)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return [st.st_size, st.st_mtime_ns, h.hexdigest()]
    except OSError:
        return None


def _no_inputs(item: Any) -> tuple:
    return ()


class _LoadDataset(Dataset):
    def __init__(self, items: Sequence[Any], load: Callable[[Any], Any], inputs: Callable[[Any], Sequence]):
        self.items, self.load, self.inputs = items, load, inputs

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, Any, list]:
        item = self.items[i]
        # identified before load reads them: a file replaced in between makes the next run redo its shard
        identity = [(str(p), identify(str(p), {})) for p in self.inputs(item)]
        try:
            return i, self.load(item), identity
        except Exception as exc:  # a bad item must never end the run
            return i, Failure("load_error", f"{type(exc).__name__}: {exc}"), identity


def _collate(batch: list) -> list:
    return batch


def _digests(identity: list) -> list[str | None]:
    return [ident[2] if ident else None for _, ident in identity]


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

    def _stats_path(self, k: int) -> Path:
        return state_dir(self.out_dir) / f"shard-{k:05d}.stats.json"

    def _span(self, k: int, n: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, n))

    def _why_not_reuse(self, k: int, ids: list[str], items: Sequence[Any], fp: str,
                       inputs: Callable[[Any], Sequence]) -> str | None:
        """Why shard ``k`` on disk cannot be reused (None: it can); refreshes its stat cache when it can."""
        span = self._span(k, len(ids))
        try:
            with pq.ParquetFile(self.shard_path(k)) as pf:
                if FOOTER_KEY not in (pf.schema_arrow.metadata or {}):
                    return "made before shards recorded their inputs"
                footer = json.loads(pf.schema_arrow.metadata[FOOTER_KEY])
                if footer["fingerprint"] != fp:
                    return "made with other items or settings"
                if (pf.metadata.num_rows != len(span) or len(footer["inputs"]) != len(span)
                        or not pf.schema_arrow.remove_metadata().equals(self.schema)):
                    return f"{pf.metadata.num_rows} rows of other columns or count, expected {len(span)}"
                if pf.read(columns=["id"]).column("id").to_pylist() != ids[span.start:span.stop]:
                    return "other ids"
        except _SHARD_ERRORS as exc:
            return f"unreadable ({type(exc).__name__}: {exc})"
        try:
            known = read_json(self._stats_path(k))
        except (OSError, ValueError):
            known = {}
        seen: dict[str, list | None] = {}
        changed = []
        for i, recorded in zip(span, footer["inputs"], strict=True):
            identity = [(str(p), identify(str(p), known)) for p in inputs(items[i])]
            seen.update(identity)
            if _digests(identity) != recorded:
                changed.append(ids[i])
        if changed:
            return f"inputs changed for {changed[:3]}{'...' if len(changed) > 3 else ''}"
        cache = {p: v for p, v in seen.items() if v}
        if cache != known and cache:
            write_json(self._stats_path(k), cache)
        return None

    def _prepare(self, ids: list[str], items: Sequence[Any], config: dict, inputs: Callable[[Any], Sequence],
                 is_main: bool) -> str:
        """Keep only the shards that verify (see the module docstring), record the fingerprint; return it."""
        fp = fingerprint(ids, {"config": config, "shard_size": self.shard_size})
        if not is_main:
            return fp
        self.out_dir.mkdir(parents=True, exist_ok=True)
        n = -(-len(ids) // self.shard_size)
        bad = {k: why for k in range(n) if self.shard_path(k).is_file()
               and (why := self._why_not_reuse(k, ids, items, fp, inputs))}
        names = {self.shard_path(k).name for k in range(n)}
        extra = [p for p in self.out_dir.glob("shard-*.parquet") if p.name not in names]
        if bad or extra or any(not self.shard_path(k).is_file() for k in range(n)):
            (self.out_dir / SUMMARY).unlink(missing_ok=True)  # it would describe shards about to change
        if bad:
            log.warning("%s: making %d of %d shards again: %s", self.out_dir, len(bad), n,
                        "; ".join(f"shard {k}: {why}" for k, why in list(bad.items())[:5]))
        for p in [*(self.shard_path(k) for k in bad), *(self._stats_path(k) for k in bad), *extra]:
            p.unlink(missing_ok=True)
        for p in [*self.out_dir.glob(".tmp-*"), *self.out_dir.glob(".*.json.*"), *state_dir(self.out_dir).glob(".*.json.*")]:
            p.unlink()  # leftovers of a killed write (write_json's temporary files too): under the lock, no other run writes here
        write_json(self.out_dir / MANIFEST, {"fingerprint": fp, "num_items": len(ids), "shard_size": self.shard_size,
                                             "num_shards": n})
        return fp

    def _write(self, k: int, entries: list[tuple[dict, list]], fp: str) -> None:
        """Shard ``k`` from ``(row, identity)`` pairs in order, with its footer; then its stat cache."""
        footer = json.dumps({"fingerprint": fp, "inputs": [_digests(identity) for _, identity in entries]})
        table = pa.Table.from_pylist([row for row, _ in entries], schema=self.schema.with_metadata({FOOTER_KEY: footer}))
        tmp = self.out_dir / f".tmp-{os.getpid()}-shard-{k:05d}.parquet"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.shard_path(k))
        cache = {p: ident for _, identity in entries for p, ident in identity if ident}
        if cache:
            write_json(self._stats_path(k), cache)

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
        inputs: Callable[[Any], Sequence[str | Path]] = _no_inputs,
    ) -> MapResult:
        """Process every item whose shard is not on disk yet, or no longer verifies; return what was done.

        ``config`` is anything that changes the results (model revision, precision, options): a change
        invalidates existing shards. ``inputs(item)`` names the files ``load`` reads (picklable, for
        workers): a change in one invalidates the item's shard. ``wait`` is the barrier between processes
        (``Runtime.wait_for_everyone``). The main process holds :func:`output_lock` throughout.
        """
        if len(items) != len(ids):
            raise ValueError(f"{len(items)} items but {len(ids)} ids")
        if len(set(ids)) != len(ids):
            raise ValueError("item ids must be unique")
        ids = list(ids)
        with output_lock(self.out_dir, process_index == 0):
            fp = self._prepare(ids, items, config, inputs, process_index == 0)
            wait()
            result = self._run_mine(items, ids, load, infer, fp, inputs, batch_size, num_workers, process_index,
                                    num_processes, desc)
            wait()
        return result

    def _run_mine(self, items: Sequence[Any], ids: list[str], load: Callable, infer: Callable, fp: str,
                  inputs: Callable, batch_size: int, num_workers: int, process_index: int, num_processes: int,
                  desc: str) -> MapResult:
        n_shards = -(-len(ids) // self.shard_size)
        mine = [k for k in range(n_shards) if k % num_processes == process_index]
        pending = [k for k in mine if not self.shard_path(k).is_file()]
        order = [i for k in pending for i in self._span(k, len(ids))]
        result = MapResult(num_items=len(ids), num_shards=n_shards, shards_reused=len(mine) - len(pending),
                           items_processed=0, seconds=0.0)
        if not order:
            return result
        loader = DataLoader(_LoadDataset([items[i] for i in order], load, inputs), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=_collate,
                            persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
                            pin_memory=False)
        buffers: dict[int, list[tuple[dict, list]]] = {}
        rank = {i: n for n, i in enumerate(ids)}
        start = time.perf_counter()
        with tqdm(total=len(order), desc=desc, unit="item", disable=process_index != 0) as bar:
            for batch in loader:
                positions = [order[j] for j, _, _ in batch]
                samples = [s for _, s, _ in batch]
                good = [(p, s) for p, s in zip(positions, samples, strict=True) if not isinstance(s, Failure)]
                outputs: list[dict | Failure] = infer([s for _, s in good]) if good else []
                if len(outputs) != len(good):
                    raise RuntimeError(f"infer returned {len(outputs)} results for {len(good)} samples")
                by_pos = dict(zip([p for p, _ in good], outputs, strict=True))
                for p, (_, s, identity) in zip(positions, batch, strict=True):
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
                    buffers.setdefault(k, []).append((row, identity))
                    if len(buffers[k]) == len(self._span(k, len(ids))):
                        self._write(k, sorted(buffers.pop(k), key=lambda e: rank[e[0]["id"]]), fp)
                result.items_processed += len(batch)
                bar.update(len(batch))
        if buffers:
            raise RuntimeError(f"shards {sorted(buffers)} were left incomplete")
        result.seconds = time.perf_counter() - start
        return result


def read_shards(out_dir: str | Path) -> pa.Table:
    """All shards under ``out_dir`` as one table in item order (footers dropped); fails when any shard is
    missing (FileNotFoundError) or unreadable (:class:`ShardError`), naming it."""
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} is missing: {out_dir} is not the output of a sharded stage")
    n = json.loads(manifest.read_text())["num_shards"]
    missing = [k for k in range(n) if not (out_dir / f"shard-{k:05d}.parquet").is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} are missing; rerun the stage")
    tables = []
    for k in range(n):
        path = out_dir / f"shard-{k:05d}.parquet"
        try:
            tables.append(pq.read_table(path).replace_schema_metadata(None))
        except _SHARD_ERRORS as exc:
            raise ShardError(f"{path} is unreadable ({type(exc).__name__}: {exc}); rerun the stage") from None
    return pa.concat_tables(tables) if tables else pa.table({})


def to_tensor_batch(arrays: list) -> torch.Tensor:
    """Stack per-sample numpy arrays into one contiguous tensor (pinned when CUDA is present)."""
    t = torch.from_numpy(np.stack(arrays))
    return t.pin_memory() if torch.cuda.is_available() else t


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
        "uses_standin_models": bool(model and model.get("standin")),
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
                                  "uses_standin_models": summary["uses_standin_models"]},
                     {"output": Path(out_dir).as_posix(), "model": model, "runtime": runtime,
                      "throughput_scope": "main process" if num_processes > 1 else "all processes",
                      "failures_this_run": dict(sorted(result.failures.items()))})
    return {**summary, "this_run": this_run, "throughput": throughput}
