"""The resumable sharded map: ordering, failures, resume, invalidation, verification, the lock, process split."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.reports import read_json
from pipelines.shards import (
    SUMMARY,
    Failure,
    OutputBusyError,
    ShardedMap,
    ShardError,
    fingerprint,
    identify,
    read_shards,
    read_summary,
    state_dir,
    write_summary,
)

SCHEMA = pa.schema([pa.field("square", pa.int64())])


def load(x: int):
    if x == 3:
        return Failure("unlucky", "three")
    if x == 5:
        raise OSError("disk says no")
    return {"x": x}


def make_infer(calls: list):
    def infer(batch):
        calls.append([b["x"] for b in batch])
        return [{"square": b["x"] ** 2} if b["x"] != 7 else Failure("too_big", "seven") for b in batch]
    return infer


def run(tmp_path, items, calls, config=None, **kw):
    m = ShardedMap(tmp_path / "out", SCHEMA, shard_size=3)
    return m.run(items, [f"i{x}" for x in items], load, make_infer(calls), config or {"v": 1}, batch_size=2, **kw)


def test_results_failures_and_order(tmp_path):
    calls = []
    res = run(tmp_path, list(range(10)), calls)
    t = read_shards(tmp_path / "out").to_pylist()
    assert [r["id"] for r in t] == [f"i{x}" for x in range(10)]
    ok = {r["id"]: r["square"] for r in t if r["ok"]}
    assert ok == {f"i{x}": x * x for x in range(10) if x not in (3, 5, 7)}
    errors = {r["id"]: r["error"] for r in t if not r["ok"]}
    assert errors == {"i3": "unlucky", "i5": "load_error", "i7": "too_big"}
    assert "disk says no" in next(r["detail"] for r in t if r["id"] == "i5")
    assert res.failures == {"unlucky": 1, "load_error": 1, "too_big": 1}
    assert res.num_shards == 4 and res.items_processed == 10 and res.shards_reused == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*")) == [f"shard-{k:05d}.parquet" for k in range(4)]


def test_rerun_reuses_finished_shards(tmp_path):
    run(tmp_path, list(range(10)), [])
    (tmp_path / "out" / "shard-00002.parquet").unlink()  # as if killed while shard 2 was being made
    calls = []
    res = run(tmp_path, list(range(10)), calls)
    assert res.shards_reused == 3 and res.items_processed == 3
    assert sorted(x for c in calls for x in c) == [6, 7, 8]  # shard 2 only
    assert len(read_shards(tmp_path / "out")) == 10


def test_changed_config_discards_shards(tmp_path):
    run(tmp_path, list(range(6)), [])
    calls = []
    res = run(tmp_path, list(range(6)), calls, config={"v": 2})
    assert res.shards_reused == 0 and res.items_processed == 6
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["fingerprint"] == fingerprint([f"i{x}" for x in range(6)], {"config": {"v": 2}, "shard_size": 3})


def test_process_split_covers_every_shard_once(tmp_path):
    items = list(range(10))
    seen = []
    for rank in range(2):
        calls = []
        run(tmp_path, items, calls, process_index=rank, num_processes=2)
        seen += [x for c in calls for x in c]
    assert sorted(seen) == [x for x in items if x not in (3, 5)]
    assert len(read_shards(tmp_path / "out")) == 10


def test_missing_shard_is_an_error(tmp_path):
    run(tmp_path, list(range(6)), [])
    (tmp_path / "out" / "shard-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="shards \\[1\\]"):
        read_shards(tmp_path / "out")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="shard_size"):
        ShardedMap(tmp_path, SCHEMA, shard_size=0)
    m = ShardedMap(tmp_path, SCHEMA, shard_size=2)
    with pytest.raises(ValueError, match="unique"):
        m.run([1, 2], ["a", "a"], load, make_infer([]), {})


def test_workers_give_the_same_table(tmp_path):
    a = ShardedMap(tmp_path / "a", SCHEMA, 3)
    b = ShardedMap(tmp_path / "b", SCHEMA, 3)
    items = list(range(8))
    ids = [str(x) for x in items]
    a.run(items, ids, load, make_infer([]), {}, batch_size=3, num_workers=0)
    b.run(items, ids, load, make_infer([]), {}, batch_size=3, num_workers=2)
    assert read_shards(tmp_path / "a").equals(read_shards(tmp_path / "b"))
    assert np.array_equal(read_shards(tmp_path / "a")["ok"].to_numpy(zero_copy_only=False),
                          np.array([x not in (3, 5, 7) for x in items]))


# --- input identity: a changed file makes its shard again -----------------------------------------------

def load_file(path: str) -> dict:
    return {"x": int(Path(path).read_text())}


def file_inputs(path: str) -> list[str]:
    return [path]


def write_inputs(tmp_path: Path, n: int = 9) -> list[str]:
    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    for x in range(n):
        (tmp_path / "in" / f"{x}.txt").write_text(str(x))
    return [str(tmp_path / "in" / f"{x}.txt") for x in range(n)]


def run_files(tmp_path: Path, paths: list[str], calls: list, **kw):
    m = ShardedMap(tmp_path / "out", SCHEMA, shard_size=3)
    return m.run(paths, [Path(p).stem for p in paths], load_file, make_infer(calls), {"v": 1}, batch_size=2,
                 inputs=file_inputs, **kw)


def test_replaced_input_remakes_its_shard_only(tmp_path):
    paths = write_inputs(tmp_path)
    run_files(tmp_path, paths, [])
    before = read_shards(tmp_path / "out")
    Path(paths[4]).write_text("40")  # a fixed raw file: same name, other bytes
    calls = []
    res = run_files(tmp_path, paths, calls)
    assert res.shards_reused == 2 and res.items_processed == 3
    assert sorted(x for c in calls for x in c) == [3, 5, 40]  # shard 1 only
    after = {r["id"]: r for r in read_shards(tmp_path / "out").to_pylist()}
    assert after["4"]["square"] == 1600
    assert [after[str(x)] for x in (0, 1, 2, 6, 7, 8)] == [r for r in before.to_pylist() if r["id"] in "012678"]


def test_missing_then_restored_input_remakes_its_shard(tmp_path):
    paths = write_inputs(tmp_path)
    run_files(tmp_path, paths, [])
    Path(paths[8]).unlink()
    res = run_files(tmp_path, paths, [])
    assert res.items_processed == 3 and read_shards(tmp_path / "out").to_pylist()[8]["error"] == "load_error"
    Path(paths[8]).write_text("8")
    res = run_files(tmp_path, paths, [])
    assert res.items_processed == 3 and read_shards(tmp_path / "out").to_pylist()[8]["square"] == 64


def test_touched_input_is_reused_and_its_stat_cached(tmp_path):
    paths = write_inputs(tmp_path)
    run_files(tmp_path, paths, [], num_workers=2)  # identities are taken in the workers
    st = os.stat(paths[4])
    os.utime(paths[4], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch: same bytes, new mtime
    calls = []
    res = run_files(tmp_path, paths, calls)
    assert res.shards_reused == 3 and res.items_processed == 0 and calls == []
    cache = read_json(state_dir(tmp_path / "out") / "shard-00001.stats.json")
    assert cache[paths[4]][:2] == [st.st_size, st.st_mtime_ns + 10**9]  # the next run need not hash it again


def test_identify_trusts_a_matching_stat_only(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    size, mtime, digest = identify(str(f), {})
    assert identify(str(f), {str(f): [size, mtime, "cached"]})[2] == "cached"  # size and mtime match: no read
    assert identify(str(f), {str(f): [size, mtime - 1, "cached"]})[2] == digest  # they differ: hashed
    assert identify(str(tmp_path / "missing"), {}) is None


def test_shards_hold_no_paths_or_times(tmp_path):
    """Only content goes into the output: the same inputs elsewhere, later, give the same shard bytes."""
    for name in ("a", "b"):
        paths = write_inputs(tmp_path / name)
        if name == "a":
            os.utime(paths[0], ns=(10**9, 10**9))
        ShardedMap(tmp_path / name / "out", SCHEMA, 3).run(paths, [Path(p).stem for p in paths], load_file,
                                                          make_infer([]), {}, inputs=file_inputs)
    for k in range(3):
        shard = f"shard-{k:05d}.parquet"
        assert (tmp_path / "a/out" / shard).read_bytes() == (tmp_path / "b/out" / shard).read_bytes()


# --- verification on reuse -------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["zero_bytes", "truncated", "swapped", "no_footer"])
def test_damaged_shard_is_made_again(tmp_path, damage, caplog):
    run(tmp_path, list(range(10)), [])
    out = tmp_path / "out"
    shard = out / "shard-00001.parquet"
    if damage == "zero_bytes":
        shard.write_bytes(b"")
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "swapped":  # a whole, readable shard in the wrong place
        shard.write_bytes((out / "shard-00002.parquet").read_bytes())
    else:  # made before shards recorded their inputs: what they were made from is unknown
        pq.write_table(pq.read_table(shard).replace_schema_metadata(None), shard)
    calls = []
    res = run(tmp_path, list(range(10)), calls)
    assert res.shards_reused == 3 and sorted(x for c in calls for x in c) == [4]  # 3 and 5 fail in load
    assert "shard 1:" in caplog.text
    assert [r["id"] for r in read_shards(out).to_pylist()] == [f"i{x}" for x in range(10)]


def test_read_shards_names_an_unreadable_shard(tmp_path):
    run(tmp_path, list(range(6)), [])
    (tmp_path / "out" / "shard-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(ShardError, match="shard-00001.parquet is unreadable"):
        read_shards(tmp_path / "out")


def test_summary_is_removed_before_shards_are_made(tmp_path):
    """A run killed mid-way leaves no summary describing the previous shards."""
    res = run(tmp_path, list(range(6)), [])
    write_summary(tmp_path / "out", res, model=None, runtime={}, config={})
    run(tmp_path, list(range(6)), [])  # reuses everything: the summary still holds
    assert read_summary(tmp_path / "out")["counts"]["rows"] == 6
    (tmp_path / "out" / "shard-00001.parquet").unlink()

    def killed(batch):
        raise KeyboardInterrupt

    m = ShardedMap(tmp_path / "out", SCHEMA, shard_size=3)
    with pytest.raises(KeyboardInterrupt):
        m.run(list(range(6)), [f"i{x}" for x in range(6)], load, killed, {"v": 1}, batch_size=2)
    assert not (tmp_path / "out" / SUMMARY).exists() and read_summary(tmp_path / "out") == {}


# --- one run at a time -----------------------------------------------------------------------------------

HOLD = """
import sys
from pipelines.shards import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_second_run_on_one_output_is_refused(tmp_path, repo_root):
    run(tmp_path, list(range(6)), [])
    out = tmp_path / "out"
    other_tmp = out / ".tmp-999999-shard-00000.parquet"  # another run's write in progress
    other_tmp.write_bytes(b"half")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(repo_root)}, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match=rf"{out} is in use by another run \(pid {holder.pid}\)"):
            run(tmp_path, list(range(6)), [], config={"v": 2})  # other settings: would discard every shard
    finally:
        holder.kill()  # like kill -9: the lock goes with the process
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()
    assert other_tmp.read_bytes() == b"half" and len(read_shards(out)) == 6
    assert run(tmp_path, list(range(6)), [], config={"v": 2}).items_processed == 6
