"""The assemble stage end to end on a tiny hand-made input, with known counts and a known NME."""
import hashlib
import json
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import committed_params
from PIL import Image
from test_reports import assert_readable_metrics

from pipelines import facesynthetics_dataset as D
from pipelines.faces.draw import draw_landmarks
from pipelines.hfdata import hash_split, read_card_metadata
from pipelines.reports import ModelInfo, provenance_path, read_json
from stages import assemble as A
from stages.config import ParamError, load

OFFSET = np.array([3.0, 4.0], np.float32)  # SPIGA = source + (3, 4): every point is 5 px off


def source_points(k: int) -> np.ndarray:
    """70 points of a plausible face, shifted a little per sample; outer eye corners 36 and 45."""
    rng = np.random.default_rng(k)
    pts = np.stack([np.linspace(150, 362, 70), 200 + 80 * np.sin(np.linspace(0, 3, 70))], axis=1)
    pts += rng.uniform(-3, 3, size=pts.shape)
    pts[36], pts[45] = (180.0 + k, 220.0), (330.0 + k, 220.0)  # inter-ocular distance 150 px
    return pts.astype(np.float32)


def write_table(directory, rows, schema):
    directory.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), directory / "shard-00000.parquet")
    (directory / "_manifest.json").write_text(json.dumps({"fingerprint": "x", "num_items": len(rows),
                                                          "shard_size": 1000, "num_shards": 1}))


STATUS = [("id", pa.string()), ("ok", pa.bool_()), ("error", pa.string()), ("detail", pa.string())]
POINTS = pa.list_(pa.list_(pa.float32()))
ANN_SCHEMA = pa.schema(STATUS + [("landmarks", POINTS), ("headpose", pa.list_(pa.float32())),
                                 ("face_box", pa.list_(pa.float32())), ("source_landmarks", POINTS)])
CAP_SCHEMA = pa.schema(STATUS + [("text", pa.string())])
SPIGA = ModelInfo("spiga", "spiga_300wpublic.pt", "f" * 64, "built by code", True, "stand-in")


@pytest.fixture
def workdir(tmp_path, monkeypatch, repo_root):
    """ids 000000-000004: 000002's annotation failed, 000004 has no caption; 3 rows are kept."""
    params = committed_params()
    params["base"]["profile"] = "sample"
    params["assemble"]["validation_count"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    raw = tmp_path / "data/raw/facesynthetics"
    raw.mkdir(parents=True)
    yy, xx = np.mgrid[0:512, 0:512]
    ann_rows, cap_rows = [], []
    for k in range(5):
        sid = f"{k:06d}"
        img = np.stack([xx // 2, yy // 2, np.full_like(xx, 40 * k)], axis=-1).astype(np.uint8)
        Image.fromarray(img).save(raw / f"{sid}.png")
        Image.fromarray(((xx // 64 + yy // 64 + k) % 19).astype(np.uint8), mode="L").save(raw / f"{sid}_seg.png")
        src = source_points(k)
        (raw / f"{sid}_ldmks.txt").write_text("".join(f"{x} {y}\n" for x, y in src))
        if k == 2:
            ann_rows.append({"id": sid, "ok": False, "error": "corrupt_image", "detail": "test"})
        else:
            ann_rows.append({"id": sid, "ok": True, "landmarks": (src[:68] + OFFSET).tolist(),
                             "headpose": [float(k), 2, 3, 4, 5, 6], "face_box": [1.0, 2.0, 3.0, 4.0 + k],
                             "source_landmarks": src.tolist()})
        if k != 4:
            cap_rows.append({"id": sid, "ok": True, "text": f"a rendered face {k}"})
    (raw / "SOURCE.json").write_text(json.dumps({"source": "embedded", "description": "faces drawn by code"}))
    annotations = tmp_path / "data/interim/facesynthetics/annotations"
    captions = tmp_path / "data/interim/facesynthetics/captions"
    write_table(annotations, ann_rows, ANN_SCHEMA)
    write_table(captions, cap_rows, CAP_SCHEMA)
    (annotations / "summary.json").write_text(json.dumps({"model": SPIGA.to_dict(), "runtime": {"device": "cpu"}}))
    (captions / "summary.json").write_text(json.dumps({"model": None}))
    # a stale file from an earlier run must disappear
    (tmp_path / "data/datasets/facesynthetics_spiga/data").mkdir(parents=True)
    (tmp_path / "data/datasets/facesynthetics_spiga/data/train-00000-of-00009.parquet").write_bytes(b"old")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_assemble_end_to_end(workdir):
    A.main(["--params", "params.yaml"])
    out = workdir / "data/datasets/facesynthetics_spiga"
    ds = datasets.load_dataset(str(out), cache_dir=str(workdir / "hf_cache"))
    assert {s: ds[s].num_rows for s in ds} == {"train": 2, "validation": 1}
    assert ds["train"].features == ds["validation"].features == D.SCHEMA.features
    for col in ("image", "conditioning_image", "text", "landmarks", "headpose", "face_box", "source_landmarks",
                "segmentation", "id"):
        assert col in ds["train"].column_names
    kept = ["000000", "000001", "000003"]
    val = min(kept, key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    assert ds["validation"]["id"] == [val]
    assert ds["train"]["id"] == [i for i in kept if i != val]  # row order preserved

    raw = workdir / "data/raw/facesynthetics"
    for row in list(ds["train"]) + list(ds["validation"]):
        sid, k = row["id"], int(row["id"])
        src = source_points(k)
        assert row["text"] == f"a rendered face {k}"
        assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(raw / f"{sid}.png")))
        assert np.array_equal(np.asarray(row["segmentation"]), np.asarray(Image.open(raw / f"{sid}_seg.png")))
        assert np.array_equal(np.asarray(row["landmarks"], np.float32), src[:68] + OFFSET)
        assert np.array_equal(np.asarray(row["source_landmarks"], np.float32), src)
        assert row["headpose"][0] == k and row["face_box"] == [1, 2, 4, 6 + k]  # shard x, y, w, h -> x1, y1, x2, y2
        drawn = draw_landmarks(src[:68] + OFFSET, size=512, line_width=4)
        assert np.array_equal(np.asarray(row["conditioning_image"].convert("RGB")), drawn)

    report_path = workdir / "reports/datasets/facesynthetics_spiga.json"
    report, details = read_json(report_path), read_json(provenance_path(report_path))
    assert_readable_metrics(report_path)
    assert report["rows"] == {"train": 2, "validation": 1, "total": 3}
    assert report["skipped"] == {"corrupt_image": 1, "missing_caption": 1} and report["skipped_total"] == 2
    assert report["landmark_nme"]["count"] == 3
    assert report["landmark_nme"]["mean"] == pytest.approx(5 / 150, abs=1e-5)  # 5 px over 150 px
    assert report["landmark_nme"]["failure_rate"] == 0.0  # 0.033 < 0.08
    assert "inter-ocular" in details["landmark_nme"]["label"] and details["landmark_nme"]["failure_threshold"] == 0.08
    assert report["assemble_images_per_s"] > 0  # annotate's and caption's are in their own run reports
    assert report["uses_standin_models"] is True and report["uses_embedded_sample"] is True
    assert details["models"]["spiga"]["revision"] == "f" * 64
    assert details["data_source"]["source"] == "embedded" and details["params"]["assemble"]["validation_count"] == 1

    card = (out / "README.md").read_text()
    meta = read_card_metadata(out / "README.md")
    assert [(s["name"], s["num_examples"]) for s in meta["dataset_info"]["splits"]] == [("train", 2), ("validation", 1)]
    assert "**Warning" in card and "stand-in" in card and "embedded sample" in card
    assert f"--dataset_name={out.relative_to(workdir).as_posix()} --image_column=image " \
           "--conditioning_image_column=conditioning_image --caption_column=text" in card
    assert "`corrupt_image`: 1" in card and "`missing_caption`: 1" in card
    assert all(line in card for line in D.SCHEMA.columns_markdown()) and "[x1, y1, x2, y2]" in card
    assert "`validation` holds the 1 id with the smallest sha1(id)" in card
    assert not (out / "data/train-00000-of-00009.parquet").exists()


def test_assemble_converts_a_sixteen_bit_image_and_the_card_says_so(workdir):
    raw = workdir / "data/raw/facesynthetics"
    yy, xx = np.mgrid[0:512, 0:512]
    grey16 = (xx * 128 + yy // 4).astype(np.uint16)  # 0..65535 over the width
    Image.fromarray(grey16).save(raw / "000001.png")  # 16-bit grey: Pillow's convert("RGB") made it all white
    A.main(["--params", "params.yaml"])
    out = workdir / "data/datasets/facesynthetics_spiga"
    ds = datasets.load_dataset(str(out), cache_dir=str(workdir / "hf_cache"))
    row = next(r for s in ds for r in ds[s] if r["id"] == "000001")
    expected = (grey16 >> 8).astype(np.uint8)
    assert np.array_equal(np.asarray(row["image"]), np.repeat(expected[..., None], 3, axis=-1))
    details = read_json(provenance_path(workdir / "reports/datasets/facesynthetics_spiga.json"))
    assert details["image_conversions"] == {"image: I;16->RGB (>>8)": 1}
    card = (out / "README.md").read_text()
    assert "value >> 8" in card and "`image: I;16->RGB (>>8)`: 1" in card


def test_validation_count_is_capped_and_workers_keep_order(workdir):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["assemble"]["validation_count"] = 10
    params["assemble"]["num_workers"] = 2
    params["assemble"]["rows_per_file"] = 1
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    A.main(["--params", "params.yaml"])
    report = read_json(workdir / "reports/datasets/facesynthetics_spiga.json")
    assert report["rows"] == {"train": 0, "validation": 3, "total": 3} and report["validation_count_capped"]
    out = workdir / "data/datasets/facesynthetics_spiga"
    assert len(list((out / "data").glob("validation-*-of-00003.parquet"))) == 3
    ds = datasets.load_dataset(str(out), cache_dir=str(workdir / "hf_cache2"))
    assert list(ds) == ["validation"]
    assert ds["validation"]["id"] == ["000000", "000001", "000003"]


def test_join_reasons():
    t = lambda rows, extra: pa.Table.from_pylist(rows, schema=pa.schema(STATUS))  # noqa: E731
    ann = t([{"id": "a", "ok": True}, {"id": "b", "ok": False, "error": "box_off_image"},
             {"id": "c", "ok": False, "error": "x"}, {"id": "d", "ok": True}], None)
    cap = t([{"id": "a", "ok": True}, {"id": "b", "ok": True}, {"id": "c", "ok": False, "error": "y"},
             {"id": "e", "ok": True}], None)
    kept, skipped, ids = D.join(ann, cap)
    assert kept == ["a"]
    assert skipped == {"box_off_image": 1, "x": 1, "missing_caption": 1, "missing_annotation": 1}
    assert ids == ["b", "c", "d", "e"]


def test_split_is_deterministic():
    ids = [f"{i:06d}" for i in range(50)]
    split = hash_split(ids, 5)
    val = sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())[:5]
    assert sorted(i for i, s in split.items() if s == "validation") == sorted(val)
    assert hash_split(list(reversed(ids)), 5) == split


def test_config_validation(repo_root):
    params = committed_params()
    _, cfg = load(A.AssembleConfig, "assemble", params, "real")
    assert cfg.validation_count == 1000 and cfg.num_workers == 8
    params["assemble"]["line_width"] = 0
    with pytest.raises(ParamError, match="assemble.line_width"):
        load(A.AssembleConfig, "assemble", params, "sample")


def test_help(capsys):
    with pytest.raises(SystemExit):
        A.main(["--help"])
    assert "train_controlnet" in capsys.readouterr().out


def test_no_rows_is_an_error(workdir):
    shutil.rmtree(workdir / "data/interim/facesynthetics/captions")
    write_table(workdir / "data/interim/facesynthetics/captions", [], CAP_SCHEMA)
    with pytest.raises(RuntimeError, match="no rows"):
        A.main(["--params", "params.yaml"])
