"""The three head-pose stages end to end in a temporary folder on the embedded samples (stand-in SPIGA)."""
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import committed_params

from pipelines.faces.boxes import face_box_from_landmarks
from pipelines.faces.pose import ours_to_spiga_rotation
from pipelines.headpose import SCHEMA
from pipelines.model_store import make_standin
from pipelines.sources.sample_faces import write_sample

SECTIONS = """
headpose_facesynthetics:
  direction_thresholds: {yaw: 15.0, pitch: 10.0}
  rows_per_file: {sample: 16, real: 1000}
headpose_photos:
  name: photos
  direction_thresholds: {yaw: 15.0, pitch: 10.0}
  detector_threshold: 0.5
  detector_upsample: {sample: 0, real: 1}
  multiple_faces_dominance: 2.0
  source: {sample: embedded, real: hf}
  batch_size: {sample: 4, real: 64}
  rows_per_file: {sample: 16, real: 1000}
  hf_dataset: nielsr/CelebA-faces
  hf_split: train
  hf_image_column: image
  max_images: {sample: null, real: 10000}
validate_headpose:
  box_margin: 5
  source: {sample: embedded, real: official}
  num_faces: 6
  batch_size: {sample: 4, real: 64}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("headpose")
    params = committed_params()
    params["base"]["profile"] = "sample"
    params.update(yaml.safe_load(SECTIONS))
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    make_standin("spiga", tmp / "data/models/spiga")
    return tmp


def test_real_profiles_parse(workdir):
    from stages import config as C
    from stages.headpose_facesynthetics import HeadposeFaceSyntheticsConfig
    from stages.headpose_photos import HeadposePhotosConfig
    from stages.validate_headpose import ValidateHeadposeConfig

    params = C.read_params(workdir / "params.yaml")
    for cls, name in ((HeadposeFaceSyntheticsConfig, "headpose_facesynthetics"),
                      (HeadposePhotosConfig, "headpose_photos"), (ValidateHeadposeConfig, "validate_headpose")):
        for profile in ("sample", "real"):
            C.load(cls, name, params, profile)
    bad = json.loads(json.dumps(params))
    bad["headpose_photos"]["source"] = "web"
    with pytest.raises(C.ParamError, match="headpose_photos.source"):
        C.load(HeadposePhotosConfig, "headpose_photos", bad, "sample")


def test_headpose_facesynthetics_stage(workdir, monkeypatch):
    """Shards made by hand from the sample's known poses: the spiga rows give those poses back exactly."""
    from spiga.data.loaders.augmentors.utils import rotation_matrix_to_euler

    from stages import headpose_facesynthetics as S

    monkeypatch.chdir(workdir)
    raw = workdir / "data/raw/facesynthetics"
    write_sample(raw, num_faces=3, num_broken=0)
    poses = json.loads((raw / "sample_poses.json").read_text())
    rows = []
    for sid, p in poses.items():
        src = np.loadtxt(raw / f"{sid}_ldmks.txt")
        euler = rotation_matrix_to_euler(ours_to_spiga_rotation(p["yaw"], p["pitch"], p["roll"]))
        rows.append({"id": sid, "ok": True, "error": None, "detail": None, "landmarks": src[:68].tolist(),
                     "headpose": [*euler, 0.0, 0.0, 4.0], "face_box": face_box_from_landmarks(src, 5).tolist(),
                     "source_landmarks": src.tolist()})
    rows.append({"id": "000099", "ok": False, "error": "corrupt_image", "detail": "test"})
    ann = workdir / "data/interim/facesynthetics/annotations"
    ann.mkdir(parents=True)
    pts = pa.list_(pa.list_(pa.float32()))
    schema = pa.schema([("id", pa.string()), ("ok", pa.bool_()), ("error", pa.string()), ("detail", pa.string()),
                        ("landmarks", pts), ("headpose", pa.list_(pa.float32())), ("face_box", pa.list_(pa.float32())),
                        ("source_landmarks", pts)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), ann / "shard-00000.parquet")
    (ann / "_manifest.json").write_text(json.dumps({"fingerprint": "x", "num_items": 4, "shard_size": 8, "num_shards": 1}))
    (ann / "summary.json").write_text(json.dumps({"model": {"standin": True}}))
    summary = S.main(["--params", "params.yaml"])
    assert summary["rows"] == 6 and summary["counts"]["annotation_failed"] == 1
    out = workdir / "data/datasets/headpose_facesynthetics"
    assert (out / "label_distribution.png").stat().st_size > 1000
    # a fresh cache: datasets reuses an older cache of a same-named folder whose card has dataset_info
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(workdir / "hf_cache_fs"))
    assert set(ds.column_names) == {"image", "yaw", "pitch", "roll", "x", "y", "scale", "direction", "landmarks",
                                    "face_box", "estimator", "source", "id"}
    assert ds.features == SCHEMA.features
    card = (out / "README.md").read_text()
    assert all(line in card for line in SCHEMA.columns_markdown()) and "one split, `train`" in card
    boxes = {r["id"]: r["face_box"] for r in rows if r["ok"]}  # the shards' x, y, w, h
    for r in ds:
        x, y, w, h = boxes[r["id"]]
        assert r["face_box"] == pytest.approx([x, y, x + w, y + h])  # the dataset's x1, y1, x2, y2
        p = poses[r["id"]]
        tol = 1e-2 if r["estimator"] == "spiga" else 4.0  # pnp: sample truth is camera-frame, labels line-of-sight
        assert [r["yaw"], r["pitch"], r["roll"]] == pytest.approx([p["yaw"], p["pitch"], p["roll"]], abs=tol)


def test_validate_headpose_stage(workdir, monkeypatch):
    from stages import validate_headpose as V

    monkeypatch.chdir(workdir)
    report = V.main(["--params", "params.yaml"])
    assert report["counts"]["images"] == 6 and report["counts"]["outside_protocol"] == 1
    assert report["counts"]["evaluated"] == 5
    gt = report["mae_degrees"]["pnp_on_ground_truth_landmarks"]
    assert gt["count"] == 5 and gt["overall"] < 1.0
    assert report["uses_standin_models"] and report["notes"]
    path = workdir / "reports/datasets/headpose_validation.json"  # the numbers; the rest beside it
    metrics, details = json.loads(path.read_text()), json.loads(path.with_name("headpose_validation.provenance.json").read_text())
    assert metrics["counts"] == report["counts"] and metrics["mae_degrees"]["pnp_on_ground_truth_landmarks"]["count"] == 5
    assert metrics["uses_standin_models"] is True and "notes" not in metrics and "convention" not in metrics
    assert details["notes"] == report["notes"] and details["models"]["spiga"]["standin"] is True
    assert details["published_overall_mae_degrees"]["6DRepNet"] == 3.97


def test_headpose_photos_streams_the_hub_dataset_at_a_resolved_commit(workdir, monkeypatch):
    """A branch in hf_revision is resolved to its commit once; the stream reads that commit (never a moving main),
    and summary.json records it. The Hub is unreachable here: its client and load_dataset are stood in for."""
    import huggingface_hub
    from PIL import Image

    from stages import config as C
    from stages import headpose_photos as P

    commit = "0123456789abcdef0123456789abcdef01234567"
    asked, streamed = [], []

    class Api:
        def dataset_info(self, repo_id, revision=None):
            asked.append((repo_id, revision))
            return type("Info", (), {"sha": commit})()

    def load_dataset(name, split, streaming, revision):
        streamed.append((name, split, streaming, revision))
        return [{"image": Image.new("RGB", (64, 64), (90, 90, 90))}]

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(workdir)
    base = C.Base(profile="sample", seed=0, device="cpu")
    cfg = P.HeadposePhotosConfig(name="hub", source="hf", direction_thresholds=P.DirectionThresholds(15.0, 10.0),
                                 detector_threshold=0.5, detector_upsample=0, multiple_faces_dominance=2.0,
                                 batch_size=2, rows_per_file=8, hf_dataset="someone/faces", hf_revision="main")
    summary = P.build(base, cfg, workdir / "data/datasets/headpose_hub")
    assert asked == [("someone/faces", "main")]
    assert streamed == [("someone/faces", "train", True, commit)]
    assert summary["source_commit"] == commit and summary["counts"]["images"] == 1


def test_headpose_photos_stage_counts_face_free_image(workdir, monkeypatch):
    from stages import headpose_photos as P

    monkeypatch.chdir(workdir)
    summary = P.main(["--params", "params.yaml"])
    c = summary["counts"]
    assert c["images"] == 6
    assert c["no_face"] >= 1  # the face-free image is counted, not crashed on
    assert c.get("multiple_faces_skipped", 0) == 1 and c.get("multiple_faces_kept_largest", 0) == 1
    assert summary["rows"] == 2 * c["faces_labelled"] and c["faces_labelled"] >= 2
    ds = datasets.load_dataset(str(workdir / "data/datasets/headpose_photos"), split="train")
    assert set(ds["estimator"]) <= {"spiga", "pnp"} and "grace_hopper.jpg" in ds["id"]


def test_validate_headpose_trusts_raw_folder_only_by_its_manifest(tmp_path):
    """The sample's rendered faces in data/raw/aflw2000, or a half-extracted folder, are not taken for AFLW2000-3D:
    the official zip is fetched, verified against the pin and swapped in; a complete official folder is reused."""
    import hashlib
    import zipfile

    from test_downloads import Server

    from pipelines.sources.aflw2000 import write_sample as write_aflw_sample
    from pipelines.sources.downloads import DownloadError
    from stages.validate_headpose import ValidateHeadposeConfig, fetch

    src = tmp_path / "src"
    write_aflw_sample(src, 2, seed=5, size=64)
    zpath = tmp_path / "AFLW2000-3D.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(src.glob("image*")):
            zf.write(p, f"AFLW2000/{p.name}")
    payload = zpath.read_bytes()
    raw = tmp_path / "data" / "raw" / "aflw2000"
    write_aflw_sample(raw, 3, seed=0, size=64)  # what the sample profile left behind (persist: true)
    srv = Server(payload)
    try:
        cfg = ValidateHeadposeConfig(source="official", box_margin=5, batch_size=4, url=srv.url,
                                     sha256=hashlib.sha256(payload).hexdigest())
        got = fetch(cfg, 0, raw)
        assert len(srv.requests) == 1 and got["source"] == "official" and got["verified"] == "sha256"
        assert got["num_faces"] == 2 and sorted(p.name for p in raw.iterdir()) == [
            "SOURCE.json", "image00000.jpg", "image00000.mat", "image00001.jpg", "image00001.mat"]
        assert fetch(cfg, 0, raw) == got and len(srv.requests) == 1  # complete and matching: reused
        (raw / "image00001.mat").unlink()  # half there: the manifest's file count no longer holds
        assert fetch(cfg, 0, raw)["num_faces"] == 2 and len(srv.requests) == 1  # refetched from the verified cache
        assert (raw / "image00001.mat").is_file()
        with pytest.raises(DownloadError, match="sha256 mismatch"):
            fetch(ValidateHeadposeConfig(source="official", box_margin=5, batch_size=4, url=srv.url, sha256="0" * 64),
                  0, raw)
        assert (raw / "SOURCE.json").is_file()  # a failed fetch leaves the previous folder
    finally:
        srv.close()
