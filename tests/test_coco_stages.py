"""The COCO humans stages end to end on the embedded sample, in a temporary folder."""
import json

import datasets
import pytest
import yaml
from conftest import committed_params

from pipelines.coco_humans import SCHEMA
from pipelines.hfdata import read_card_metadata
from pipelines.reports import provenance_path, read_json
from pipelines.sources import coco as S
from stages import assemble_coco, bench_coco_select, fetch_coco, select_coco
from stages.config import ParamError, load


@pytest.fixture
def params(tmp_path, monkeypatch, repo_root):
    """The repo's params.yaml (sample profile) with a small synthetic file for the selection benchmark."""
    merged = committed_params()
    merged["base"]["profile"] = "sample"
    merged["bench_coco_select"] = {"num_images": 300, "num_persons": 700}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merged))
    monkeypatch.chdir(tmp_path)
    return merged


def test_both_profiles_parse_and_bad_values_are_named(params):
    for profile in ("sample", "real"):
        load(fetch_coco.FetchCocoConfig, "fetch_coco", params, profile)
        load(select_coco.SelectCocoConfig, "select_coco", params, profile)
        load(assemble_coco.AssembleCocoConfig, "assemble_coco", params, profile)
        load(bench_coco_select.BenchCocoConfig, "bench_coco_select", params, profile)
    bad = {**params, "select_coco": {**params["select_coco"], "face_visibility": 3}}
    with pytest.raises(ParamError, match="select_coco.face_visibility"):
        load(select_coco.SelectCocoConfig, "select_coco", bad)
    bad = {**params, "fetch_coco": {**params["fetch_coco"], "source": "local"}}
    with pytest.raises(ParamError, match="fetch_coco.local_dir"):
        load(fetch_coco.FetchCocoConfig, "fetch_coco", bad)


def test_stages_end_to_end(params, tmp_path):
    fetch_coco.main(["annotations"])
    assert not S.annotations_complete("data/raw/coco")
    select_coco.main([])
    sel = read_json("data/interim/coco_humans/selection.json")
    assert sel["splits"]["train"]["image_ids"] == [1, 2, 11, 12]
    assert sel["splits"]["val"]["image_ids"] == [101, 102]
    assert [r["rule"] for r in sel["splits"]["train"]["removed_in_order"]] == sel["rule_order"]
    assert all(r["removed"] == 1 for r in sel["splits"]["train"]["removed_in_order"])
    assert sel["splits"]["train"]["removed"]["crowd"] == 1 and sel["splits"]["val"]["removed"]["crowd"] == 1

    fetch_coco.main(["images"])
    got = read_json("data/raw/coco/images/SOURCE.json")
    assert got["counts"] == {"present": 0, "fetched": 5, "missing": 1, "failed": 0}
    assert list(got["problems"]["train"]) == ["11"]
    assert sorted(p.name for p in (tmp_path / "data/raw/coco/images/train2017").iterdir()) == [
        "000000000001.jpg", "000000000002.jpg", "000000000012.jpg"]
    fetch_coco.main(["images"])  # a rerun keeps what is there
    assert read_json("data/raw/coco/images/SOURCE.json")["counts"]["present"] == 5

    assemble_coco.main([])
    report = read_json("reports/datasets/coco_humans.json")  # numbers; the rest in coco_humans.provenance.json
    details = read_json(provenance_path("reports/datasets/coco_humans.json"))
    assert report["rows"] == {"train": 3, "validation": 2, "total": 5}
    assert report["skipped"]["train"]["missing_image"] == 1
    assert report["selection"]["train"] == {"num_images": 12, "kept": 4}
    assert details["selection"]["train"]["removed"]["malformed_annotation"] == 1
    assert details["rule_order"] == list(select_coco.RULES) and details["image_fetch"]["counts"]["missing"] == 1
    assert report["uses_embedded_sample"] is True and report["uses_standin_models"] is False
    ds = datasets.load_dataset("data/datasets/coco_humans", cache_dir=str(tmp_path / "hf_cache"))
    assert set(ds) == {"train", "validation"} and ds["train"].num_rows == 3 and ds["validation"].num_rows == 2
    assert ds["train"].features == ds["validation"].features == SCHEMA.features
    row = ds["train"][0]
    assert row["image_id"] == 1 and row["image"].size == (320, 256) and row["person_mask"].mode == "L"
    assert (sum(1 for v in row["person_mask"].getdata() if v == 255) / (320 * 256)
            == pytest.approx(row["person_area_fraction"]))
    assert len(row["face_boxes"]) == 1 and len(row["face_boxes"][0]) == 4 and row["text"]
    meta = read_card_metadata("data/datasets/coco_humans/README.md")
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == {"train": 3, "validation": 2}
    card = (tmp_path / "data/datasets/coco_humans/README.md").read_text()
    assert "37,470" in card and "low_person_fraction" in card
    assert all(line in card for line in SCHEMA.columns_markdown()) and "[x1, y1, x2, y2]" in card
    assert "train2017" in card and "val2017" in card


def test_missing_selection_is_a_clear_error(params):
    with pytest.raises(FileNotFoundError, match="select_coco"):
        assemble_coco.main([])


def test_local_source_copies_annotations_and_images(params, tmp_path):
    local = tmp_path / "mycoco"
    S.write_coco_sample(local, seed=1)
    local_params = {**params, "fetch_coco": {**params["fetch_coco"], "source": "local", "local_dir": str(local)}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(local_params))
    fetch_coco.main(["annotations"])
    select_coco.main([])
    fetch_coco.main(["images"])
    assert read_json("data/raw/coco/images/SOURCE.json")["counts"]["fetched"] == 5


def test_bench_small(params):
    bench_coco_select.main([])
    r = json.loads(open("reports/bench/coco_select.json").read())
    assert r["synthetic_file"]["num_images"] == 300 and r["synthetic_file"]["num_persons"] == 700
    assert r["peak_rss_mib"] > 0 and r["total_seconds"] >= 0 and set(r["removed"]) == set(select_coco.RULES)
    details = read_json(provenance_path("reports/bench/coco_select.json"))
    assert details["machine"]["cpus"] > 0 and {"min_side", "max_persons"} <= set(details["rule"]) and details["limit"]


def test_fetch_annotations_official_verified_by_md5(params, tmp_path):
    """The official zip is checked against its md5 pin and swapped in; a mismatch leaves the previous folder."""
    import hashlib
    import zipfile

    from test_downloads import Server

    from pipelines.sources.downloads import DownloadError

    zpath = tmp_path / "annotations_trainval2017.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for kind in S.KINDS:
            for split in S.SPLITS:
                zf.writestr(f"annotations/{kind}_{split}2017.json", "{}")
    payload = zpath.read_bytes()
    zpath.unlink()
    srv = Server(payload)
    try:
        cfg = fetch_coco.FetchCocoConfig(source="official", annotations_url=srv.url, md5=hashlib.md5(payload).hexdigest())
        base = load(fetch_coco.FetchCocoConfig, "fetch_coco", params)[0]
        info = fetch_coco.fetch_annotations(base, cfg, tmp_path / "coco")
        assert info["verified"] == "md5" and info["complete"] is True and info["files"] == 6
        assert not S.annotations_complete(tmp_path / "coco") and "CC BY 4.0" in info["license"]
        bad = fetch_coco.FetchCocoConfig(source="official", annotations_url=srv.url, md5="0" * 32)
        (tmp_path / "cache").mkdir(exist_ok=True)
        with pytest.raises(DownloadError, match="md5 mismatch"):
            fetch_coco.fetch_annotations(base, bad, tmp_path / "coco")
        assert read_json(tmp_path / "coco" / "annotations" / "SOURCE.json") == info
    finally:
        srv.close()
    with pytest.raises(ParamError, match=r"fetch_coco\.md5: expected 32 hex digits"):
        load(fetch_coco.FetchCocoConfig, "fetch_coco", {**params, "fetch_coco": {**params["fetch_coco"], "md5": "xyz"}})
