"""Measurements under a time budget, each in a worker process that can be cut without losing what it measured.

:func:`run_measurements` runs :class:`Measurement` s one after the other in a spawned worker process. A
measurement is a function ``fn(probe, **kwargs)`` named ``"module:function"``; it reports figures as it goes with
``probe.put(key, value)`` (each sent to the parent at once) and may ask ``probe.time_left()`` to size its work.
Each gets ``min(cap_s, budget left)`` seconds: past that the worker is killed and the measurement recorded as
``cut`` with the figures it had sent; the next one starts a fresh worker. Running out of GPU memory is recorded
as ``out_of_memory`` (the worker frees its cache and goes on), any other exception as ``error``, a worker that
dies as ``crashed``; once the budget is spent the rest are recorded as ``skipped``, as is one that raises
:class:`SkipMeasurement` (what it reads was not made). Nothing of that is fatal.
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("ok", "cut", "out_of_memory", "error", "crashed", "skipped")
MIN_START_S = 2.0  # a measurement is not started with less budget left than this
POLL_S = 0.5  # how often the parent looks whether the worker is still alive


class SkipMeasurement(Exception):
    """Raised by a measurement that cannot run here (an earlier one it reads from did not finish): ``skipped``."""


@dataclass(frozen=True)
class Measurement:
    """One measurement: ``target`` ``"module:function"`` called as ``fn(probe, **kwargs)`` within ``cap_s`` s."""

    name: str
    target: str
    cap_s: float
    kwargs: dict[str, Any] = field(default_factory=dict)


class Probe:
    """What a measurement sees in the worker: ``put`` sends a figure to the parent, ``time_left`` its seconds."""

    def __init__(self, send: Callable[[tuple], None], deadline: float):
        self._send, self._deadline = send, deadline

    def put(self, key: str, value: Any) -> None:
        """Record ``value`` (JSON-able) under ``key``; kept even if the measurement is cut later."""
        self._send(("put", key, value))

    def time_left(self) -> float:
        return self._deadline - time.monotonic()


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.OutOfMemoryError`` or a CUDA library's "out of memory" error."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker(commands: Any, results: Any, setup: str | None, start_method: str) -> None:
    """The worker process: runs ``setup`` (a target returning a JSON-able dict, sent as ``ready``), then one
    measurement per command until told to stop. It leads its own process group, so that cutting it also ends
    the processes a measurement started (the training matrix runs each configuration in a child). Its default
    start method is the parent's (a spawned process's is ``spawn``), so the DataLoader workers a measurement
    starts are made as in a stage run from the shell (forked on Linux, not fresh interpreters importing torch)."""
    os.setpgrp()
    multiprocessing.set_start_method(start_method, force=True)
    try:
        info = _resolve(setup)() if setup else {}
    except Exception as exc:  # the parent records it on every measurement
        info = {"setup_error": f"{type(exc).__name__}: {exc}"}
    results.put(("ready", info))
    while True:
        command = commands.get()
        if command is None:
            return
        target, kwargs, cap_s = command
        probe = Probe(results.put, time.monotonic() + cap_s)
        try:
            _resolve(target)(probe, **kwargs)
            results.put(("done", None))
        except SkipMeasurement as exc:
            results.put(("skipped", str(exc), ""))
        except Exception as exc:  # recorded, never fatal
            status = "out_of_memory" if is_out_of_memory(exc) else "error"
            results.put((status, f"{type(exc).__name__}: {exc}"[:2000], traceback.format_exc(limit=8)[-4000:]))
            if status == "out_of_memory":
                _free_cuda_cache()


def _free_cuda_cache() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: S110 - best effort after an OOM
        pass


class _Worker:
    def __init__(self, setup: str | None):
        ctx = multiprocessing.get_context("spawn")
        self.commands, self.results = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=_worker, args=(self.commands, self.results, setup, multiprocessing.get_start_method()))
        self.process.start()

    def get(self, timeout: float) -> tuple | None:
        """The next message, or None at ``timeout`` or when the worker died (check ``alive``)."""
        end = time.monotonic() + timeout
        while True:
            try:
                return self.results.get(timeout=max(0.01, min(POLL_S, end - time.monotonic())))
            except queue.Empty:
                if not self.alive or time.monotonic() >= end:
                    return None

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        """End the worker and every process it started (its process group)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            self.process.kill()
        self.process.join(10)

    def stop(self) -> None:
        if self.process.is_alive():
            self.commands.put(None)
            self.process.join(10)
        self.kill()


def run_measurements(measurements: Sequence[Measurement], budget_s: float, *, setup: str | None = None,
                     on_record: Callable[[dict, dict], None] = lambda record, info: None) -> tuple[list[dict], dict]:
    """Run ``measurements`` in order within ``budget_s`` seconds in all (worker start-ups included).

    Returns one record per measurement (``name``, ``status`` of :data:`STATUSES`, ``results``: the figures it
    put, ``seconds``, ``cap_s``, ``error`` and ``traceback`` where it failed) and the ``setup`` target's dict of
    the first worker (environment facts, say). ``on_record(record, setup_dict)`` is called with each record as soon as it is final.
    """
    start = time.monotonic()
    records: list[dict] = []
    worker: _Worker | None = None
    info: dict = {}
    try:
        for m in measurements:
            record: dict[str, Any] = {"name": m.name, "status": "skipped", "results": {}, "seconds": 0.0, "cap_s": m.cap_s}
            left = budget_s - (time.monotonic() - start)
            if left < MIN_START_S:
                record["error"] = f"the budget of {budget_s:.0f} s was spent before it started"
            else:
                if worker is None or not worker.alive:
                    worker = _Worker(setup)
                    ready = worker.get(left)
                    if ready is None:
                        record.update(status="crashed" if not worker.alive else "cut",
                                      error="the worker process did not start within the budget")
                        worker.kill()
                        worker = None
                        records.append(record)
                        on_record(record, info)
                        continue
                    info = info or ready[1]
                left = budget_s - (time.monotonic() - start)
                cap = min(m.cap_s, left)
                record["cap_s"] = cap
                worker = _run_one(worker, m, cap, record)
            records.append(record)
            on_record(record, info)
    finally:
        if worker is not None:
            worker.stop()
    return records, info


def _run_one(worker: _Worker, m: Measurement, cap: float, record: dict) -> _Worker | None:
    """Run ``m`` on ``worker`` for at most ``cap`` s, filling ``record``; the worker to use next (None: dead)."""
    t0 = time.monotonic()
    worker.commands.put((m.target, m.kwargs, cap))
    while True:
        msg = worker.get(cap - (time.monotonic() - t0))
        record["seconds"] = time.monotonic() - t0
        if msg is None:
            if worker.alive:
                record.update(status="cut", error=f"stopped at its cap of {cap:.0f} s")
            else:
                record.update(status="crashed", error=f"the worker process died (exit code {worker.process.exitcode})")
            worker.kill()
            return None
        kind = msg[0]
        if kind == "put":
            record["results"][msg[1]] = msg[2]
        elif kind == "done":
            record["status"] = "ok"
            return worker
        else:
            record.update(status=kind, error=msg[1], traceback=msg[2])
            return worker
