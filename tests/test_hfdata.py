"""Hub-layout parquet shards + card: datasets.load_dataset(<dir>) reads them back exactly."""
import datasets
import numpy as np
import pytest
from PIL import Image

from pipelines.facesynthetics_dataset import SCHEMA
from pipelines.hfdata import (
    ParquetShardWriter,
    files_key,
    load_local_split,
    read_card_metadata,
    size_category,
    write_card,
)


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append({
            "id": f"{i:06d}",
            "image": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),  # numpy array
            "conditioning_image": Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)),  # PIL image
            "text": f"a face number {i}",
            "landmarks": (rng.random((68, 2)) * 512).astype(np.float32),
            "headpose": rng.standard_normal(6).astype(np.float32),
            "face_box": np.array([10.5, 20.25, 100, 120], np.float32),
            "source_landmarks": (rng.random((70, 2)) * 512).astype(np.float32),
            "segmentation": rng.integers(0, 19, (24, 24), dtype=np.uint8),
        })
    return rows


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    features = SCHEMA.features
    rows = make_rows(5)
    writers = {}
    for split, part in (("train", rows[:3]), ("validation", rows[3:])):
        with ParquetShardWriter(out, split, features, rows_per_file=2) as w:
            for r in part:
                w.write(r)
        writers[split] = w
    write_card(out, pretty_name="test", features=features, splits={"train": 3, "validation": 2}, license="other",
               source_datasets=["microsoft/FaceSynthetics"], task_categories=["text-to-image"],
               body_markdown="# Test\n\nprose", tags=["faces"],
               split_bytes={s: w.num_bytes for s, w in writers.items()})
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path_factory.mktemp("cache")))
    return out, rows, writers, ds


def test_files_are_in_hub_layout(written):
    out, _, writers, _ = written
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "validation-00000-of-00001.parquet"]
    assert writers["train"].rows_written == 3 and len(writers["train"].files) == 2
    assert writers["validation"].rows_written == 2 and writers["train"].num_bytes > 0


def test_load_dataset_reads_splits_and_values(written):
    _, rows, _, ds = written
    assert set(ds) == {"train", "validation"}
    assert ds["train"].num_rows == 3 and ds["validation"].num_rows == 2
    assert ds["train"].features == SCHEMA.features
    got = list(ds["train"]) + list(ds["validation"])
    for want, row in zip(rows, got, strict=True):
        assert row["id"] == want["id"] and row["text"] == want["text"]
        assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
        assert np.array_equal(np.asarray(row["image"]), want["image"])
        assert np.array_equal(np.asarray(row["conditioning_image"]), np.asarray(want["conditioning_image"]))
        assert np.array_equal(np.asarray(row["segmentation"]), want["segmentation"])
        for key in ("landmarks", "headpose", "face_box", "source_landmarks"):
            assert np.array_equal(np.asarray(row[key], dtype=np.float32), want[key]), key


def test_card_front_matter(written):
    out, _, _, _ = written
    meta = read_card_metadata(out / "README.md")
    assert meta["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "data/train-*"}, {"split": "validation", "path": "data/validation-*"}]}]
    assert datasets.Features._from_yaml_list(meta["dataset_info"]["features"]) == SCHEMA.features
    assert [(s["name"], s["num_examples"]) for s in meta["dataset_info"]["splits"]] == [("train", 3), ("validation", 2)]
    assert meta["size_categories"] == ["n<1K"] and meta["license"] == "other"
    assert meta["task_categories"] == ["text-to-image"] and meta["tags"] == ["faces"]
    assert (out / "README.md").read_text().rstrip().endswith("# Test\n\nprose")


def test_size_category():
    assert size_category(0) == "n<1K" and size_category(999) == "n<1K"
    assert size_category(1000) == "1K<n<10K" and size_category(25_000) == "10K<n<100K"
    assert size_category(100_000) == "100K<n<1M" and size_category(10**13) == "n>1T"


def test_aborted_writer_leaves_nothing(tmp_path):
    features = SCHEMA.features
    with pytest.raises(RuntimeError):
        with ParquetShardWriter(tmp_path, "train", features, rows_per_file=1) as w:
            w.write(make_rows(1)[0])
            raise RuntimeError("boom")
    assert list((tmp_path / "data").iterdir()) == []


def test_missing_column_is_an_error(tmp_path):
    row = make_rows(1)[0]
    del row["text"]
    with ParquetShardWriter(tmp_path, "train", SCHEMA.features) as w, pytest.raises(ValueError, match="text"):
        w.write(row)


def test_a_rebuilt_local_dataset_is_never_read_stale(tmp_path):
    """datasets' own cache hands back the old rows of a folder rebuilt in place (the card holds dataset_info);
    load_local_split keys its cache by the files, so the rebuilt rows are read and an unchanged folder reuses."""
    import shutil

    features = datasets.Features({"id": datasets.Value("string"), "v": datasets.Value("int32")})
    out, cache = tmp_path / "ds", tmp_path / "cache"
    seen, raw = [], []
    for v in (1, 2):
        if out.exists():
            shutil.rmtree(out)
        with ParquetShardWriter(out, "train", features, 10) as writer:
            writer.write({"id": "a", "v": v})
        write_card(out, pretty_name="t", features=features, splits={"train": 1}, license="mit", source_datasets=[],
                   task_categories=[], body_markdown="")
        raw.append(datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "raw"))["v"][0])
        seen.append(load_local_split(out, "train", cache)["v"][0])
    assert seen == [1, 2]
    assert raw == [1, 1]  # the failure this guards against (if datasets fixes it, this line can go)
    key = files_key(out)
    assert load_local_split(out, "train", cache)["v"][0] == 2 and files_key(out) == key
    assert len(list((cache / "facecontrol-local").iterdir())) == 2  # one cache per version of the files
