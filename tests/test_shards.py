"""The resumable sharded map: ordering, failures, resume, invalidation, process split."""
import json

import numpy as np
import pyarrow as pa
import pytest

from pipelines.shards import Failure, ShardedMap, fingerprint, read_shards

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
