"""The FaceSynthetics reader, face boxes, the embedded sample and zip extraction: known answers."""
from __future__ import annotations

import json
import types
import unittest.mock
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.faces.boxes import box_inside_fraction, face_box_from_landmarks
from pipelines.sources import facesynthetics as fs
from pipelines.sources.downloads import extract_zip
from pipelines.sources.sample_faces import (
    LEFT_EYE,
    MOUTH_INTERIOR,
    RIGHT_EYE,
    SKIN,
    mean_face_3d,
    project_face,
    render_face,
    write_sample,
)


def _png(path: Path, size: int = 8, color=(10, 20, 30)) -> Path:
    Image.new("RGB", (size, size), color).save(path)
    return path


def _ldmks(path: Path, n: int = 70) -> Path:
    path.write_text("".join(f"{i}.5 {2 * i}\n" for i in range(n)))
    return path


# ------------------------------------------------------------------------------------------- reader

def test_list_samples_ids_sorted_and_partial(tmp_path):
    _png(tmp_path / "000002.png")
    _ldmks(tmp_path / "000001_ldmks.txt")
    _png(tmp_path / "000001_seg.png")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "12345.png").write_text("x")  # 5 digits: not a sample
    samples = fs.list_samples(tmp_path)
    assert [s.id for s in samples] == ["000001", "000002"]
    assert samples[0].landmarks_path == tmp_path / "000001_ldmks.txt"
    with pytest.raises(FileNotFoundError, match="fetch_facesynthetics"):
        fs.list_samples(tmp_path / "nope")


def test_read_image_reasons(tmp_path):
    good = _png(tmp_path / "a.png", 8, (1, 2, 3))
    arr = fs.read_image(good, size=8)
    assert arr.shape == (8, 8, 3) and tuple(arr[0, 0]) == (1, 2, 3)
    with pytest.raises(fs.SampleError) as e:
        fs.read_image(tmp_path / "missing.png")
    assert e.value.reason == fs.MISSING_IMAGE
    with pytest.raises(fs.SampleError) as e:
        fs.read_image(good, size=16)
    assert e.value.reason == fs.WRONG_IMAGE_SIZE and "8x8" in str(e.value)
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(fs.SampleError) as e:
        fs.read_image(tmp_path / "junk.png")
    assert e.value.reason == fs.CORRUPT_IMAGE
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big)
    (tmp_path / "trunc.png").write_bytes(big.read_bytes()[:200])
    with pytest.raises(fs.SampleError) as e:
        fs.read_image(tmp_path / "trunc.png")
    assert e.value.reason == fs.CORRUPT_IMAGE


def test_read_landmarks_reasons(tmp_path):
    pts = fs.read_landmarks(_ldmks(tmp_path / "ok.txt"))
    assert pts.shape == (70, 2) and pts.dtype == np.float32
    assert pts[3].tolist() == [3.5, 6.0]
    cases = {
        "missing": (None, fs.MISSING_LANDMARKS),
        "short": ("".join("1 2\n" for _ in range(60)), fs.BAD_LANDMARKS),
        "text": ("a b\n" * 70, fs.BAD_LANDMARKS),
        "three": ("1 2 3\n" * 70, fs.BAD_LANDMARKS),
        "nan": ("nan 1\n" + "1 2\n" * 69, fs.BAD_LANDMARKS),
    }
    for name, (text, reason) in cases.items():
        path = tmp_path / f"{name}.txt"
        if text is not None:
            path.write_text(text)
        with pytest.raises(fs.SampleError) as e:
            fs.read_landmarks(path)
        assert e.value.reason == reason, name


# ------------------------------------------------------------------------------------------- boxes

def test_face_box_plus_minus_five_rule():
    pts = np.array([[10.0, 20.0], [110.0, 70.0], [50.0, 40.0]])
    assert face_box_from_landmarks(pts).tolist() == [5.0, 15.0, 110.0, 60.0]
    assert face_box_from_landmarks(pts, margin=0).tolist() == [10.0, 20.0, 100.0, 50.0]
    with pytest.raises(ValueError):
        face_box_from_landmarks(np.array([[np.nan, 1.0]]))


def test_box_inside_fraction_known_answers():
    assert box_inside_fraction(np.array([0, 0, 10, 10]), 100, 100) == 1.0
    assert box_inside_fraction(np.array([-5, 0, 10, 10]), 100, 100) == 0.5
    assert box_inside_fraction(np.array([95, 95, 10, 10]), 100, 100) == 0.25
    assert box_inside_fraction(np.array([200, 0, 10, 10]), 100, 100) == 0.0
    assert box_inside_fraction(np.array([0, 0, 0, 10]), 100, 100) == 0.0


# ------------------------------------------------------------------------------------------- projection

def test_mean_face_is_ibug_ordered():
    m = mean_face_3d()
    assert m.shape == (68, 3)
    assert m[30].tolist() == [0.0, 0.0, 0.0]  # SPIGA's origin is the nose tip
    assert m[0, 0] < 0 < m[16, 0]  # jaw runs from image-left to image-right
    assert m[8, 1] < m[36, 1]  # chin below the eyes (y up)


def test_projection_zero_pose_upright_symmetric():
    p = project_face(0, 0, 0, (256.0, 256.0), 0.5, size=512)
    assert p.shape == (70, 2)
    assert p[8, 1] > p[36:48, 1].max() + 100  # chin well below the eyes
    assert p[33, 1] > p[27, 1]  # nose base below the bridge
    assert p[0, 0] < p[30, 0] < p[16, 0]
    assert abs(p[30, 0] - 256.0) < 2.0 and abs(p[8, 0] - 256.0) < 2.0  # nose tip and chin on the midline
    # Mirror pairs (jaw 0/16, outer eye corners 36/45) sit at the same distance from the midline.
    assert abs((p[16, 0] - 256.0) - (256.0 - p[0, 0])) < 3.0
    assert abs((p[45, 0] - 256.0) - (256.0 - p[36, 0])) < 5.0  # the mean face is slightly asymmetric
    # scale = face width at the depth of the head centre, as a fraction of the image side.
    assert 0.42 * 512 < p[16, 0] - p[0, 0] < 0.5 * 512  # the jaw lies behind the head centre: a bit narrower
    # Pupils are the eye-contour centres.
    np.testing.assert_allclose(p[68], p[36:42].mean(axis=0), atol=1.0)
    np.testing.assert_allclose(p[69], p[42:48].mean(axis=0), atol=1.0)


def test_projection_pose_signs():
    c = (256.0, 256.0)
    p0 = project_face(0, 0, 0, c, 0.5)
    yaw = project_face(30, 0, 0, c, 0.5)
    assert yaw[30, 0] < p0[30, 0] - 20  # yaw > 0: nose tip to image-left
    assert project_face(-30, 0, 0, c, 0.5)[30, 0] > p0[30, 0] + 20
    pitch = project_face(0, 15, 0, c, 0.5)
    assert pitch[30, 1] < p0[30, 1] - 10  # pitch > 0: looks up, nose tip moves up
    roll = project_face(0, 0, 15, c, 0.5)
    assert roll[27, 0] > p0[27, 0] + 10 and roll[8, 0] < p0[8, 0] - 10  # roll > 0: clockwise
    # Centre and scale: the head centroid lands on center_xy; twice the scale, nearly twice the size
    # (a closer camera: stronger perspective shrinks the jaw, which lies behind the head centre).
    shifted = project_face(0, 0, 0, (300.0, 200.0), 0.5)
    np.testing.assert_allclose(shifted[:68].mean(axis=0), (300.0, 200.0), atol=2.0)
    big = project_face(0, 0, 0, c, 1.0)
    assert 1.75 < (big[16, 0] - big[0, 0]) / (p0[16, 0] - p0[0, 0]) < 2.0


def test_render_face_classes_where_drawn():
    p = project_face(0, 0, 0, (128.0, 128.0), 0.5, size=256)
    img, seg = render_face(p, 256, np.random.default_rng(1))
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8 and seg.shape == (256, 256)
    assert seg[0, 0] == 0 and seg[5, 250] == 0  # corners are background
    re_, le_ = np.round(p[68]).astype(int), np.round(p[69]).astype(int)
    assert seg[re_[1], re_[0]] == RIGHT_EYE and seg[le_[1], le_[0]] == LEFT_EYE  # subject's right eye is image-left
    cheek = np.round((p[3] + p[30]) / 2).astype(int)
    assert seg[cheek[1], cheek[0]] == SKIN
    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12}
    assert MOUTH_INTERIOR not in seg[: int(p[27, 1])]  # nothing of the mouth above the nose bridge


# ------------------------------------------------------------------------------------------- sample

def _tree(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_write_sample_deterministic_counts_and_broken(tmp_path):
    a = write_sample(tmp_path / "a", num_faces=5, num_broken=4, seed=3, size=128)
    write_sample(tmp_path / "b", num_faces=5, num_broken=4, seed=3, size=128)
    write_sample(tmp_path / "c", num_faces=5, num_broken=4, seed=4, size=128)
    ta, tb = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert ta == tb
    assert ta["000000.png"] != _tree(tmp_path / "c")["000000.png"]
    # 9 landmark and segmentation files, 8 images (one missing on purpose), 2 json files.
    assert len(ta) == 9 + 9 + 8 + 2
    samples = fs.list_samples(tmp_path / "a")
    assert [s.id for s in samples] == [f"{i:06d}" for i in range(9)]
    source = json.loads(ta["SOURCE.json"])
    assert source["source"] == "embedded" and "not FaceSynthetics images" in source["description"]
    assert source["broken"] == {"000005": fs.MISSING_IMAGE, "000006": fs.CORRUPT_IMAGE,
                                "000007": fs.BAD_LANDMARKS, "000008": fs.WRONG_IMAGE_SIZE}
    assert a["broken"] == source["broken"]
    for s in samples:
        try:
            fs.read_image(s.image_path, size=128)
            fs.read_segmentation(s.segmentation_path, size=128 if s.id != "000008" else None)
            pts = fs.read_landmarks(s.landmarks_path)
        except fs.SampleError as exc:
            assert source["broken"].get(s.id) == exc.reason, s.id
            continue
        assert s.id not in source["broken"]
        box = face_box_from_landmarks(pts)
        assert box_inside_fraction(box, 128, 128) == 1.0
        assert 0.3 * 128 < box[2] < 0.7 * 128
    # The ground-truth poses reproduce the landmark files.
    poses = json.loads(ta["sample_poses.json"])
    assert sorted(poses) == [f"{i:06d}" for i in range(5)]
    for sid, pose in poses.items():
        assert abs(pose["yaw"]) <= 40 and abs(pose["pitch"]) <= 20 and abs(pose["roll"]) <= 15
        expected = project_face(pose["yaw"], pose["pitch"], pose["roll"], tuple(pose["center"]), pose["scale"], 128)
        got = fs.read_landmarks(tmp_path / "a" / f"{sid}_ldmks.txt")
        np.testing.assert_allclose(got, expected, atol=1e-3)


def test_write_sample_default_size_is_fast(tmp_path):
    import time

    start = time.perf_counter()
    write_sample(tmp_path, num_faces=24, num_broken=4, seed=0)
    assert time.perf_counter() - start < 4.0  # well under 2 s on an idle core; slack for shared CI
    with Image.open(tmp_path / "000000.png") as im:
        assert im.size == (512, 512) and im.mode == "RGB"
    with Image.open(tmp_path / "000027.png") as im:
        assert im.size == (256, 256)


# ------------------------------------------------------------------------------------------- zip

def test_extract_zip_strips_top_folder(tmp_path):
    zpath = tmp_path / "dataset_100.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("dataset_100/", "")
        zf.writestr("dataset_100/000000.png", b"png")
        zf.writestr("dataset_100/000000_ldmks.txt", b"1 2\n")
        zf.writestr("__MACOSX/dataset_100/._000000.png", b"junk")
    out = tmp_path / "out"
    written = extract_zip(zpath, out)
    assert written == [out / "000000.png", out / "000000_ldmks.txt"]
    assert (out / "000000.png").read_bytes() == b"png"
    assert not (out / "dataset_100").exists() and not (out / "__MACOSX").exists()
    kept = extract_zip(zpath, tmp_path / "kept", strip_top_level=False)
    assert kept[0] == tmp_path / "kept" / "dataset_100" / "000000.png"


def test_extract_zip_without_single_top_folder_keeps_paths(tmp_path):
    zpath = tmp_path / "flat.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("a.txt", b"a")
        zf.writestr("sub/b.txt", b"b")
    assert extract_zip(zpath, tmp_path / "o") == [tmp_path / "o" / "a.txt", tmp_path / "o" / "sub" / "b.txt"]


@pytest.mark.parametrize("name", ["../evil", "dataset_100/../../evil", "/abs/evil"])
def test_extract_zip_rejects_path_traversal(tmp_path, name):
    zpath = tmp_path / "evil.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("dataset_100/000000.png", b"ok")
        zf.writestr(name, b"evil")
    out = tmp_path / "deep" / "out"
    with pytest.raises(ValueError, match="outside"):
        extract_zip(zpath, out)
    assert not (tmp_path / "deep" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not out.exists()  # nothing written: the archive is checked before extraction


def _zip_declaring(path: Path, member: str, data: bytes, declared: int) -> Path:
    """A zip whose member ``member`` holds ``data`` but whose headers declare ``declared`` uncompressed bytes."""
    import struct

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, data)
    raw = bytearray(path.read_bytes())
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    struct.pack_into("<I", raw, local + 22, declared)  # local header: uncompressed size
    struct.pack_into("<I", raw, central + 24, declared)  # central directory: uncompressed size
    path.write_bytes(bytes(raw))
    return path


def test_extract_zip_refuses_a_bomb_before_writing(tmp_path):
    """A small zip declaring 2 GiB is refused against max_bytes and against the free disk, nothing written."""
    from pipelines.sources import downloads as D

    zpath = _zip_declaring(tmp_path / "bomb.zip", "big.bin", b"\0" * (1 << 20), 2 << 30)
    assert zpath.stat().st_size < 10_000
    out = tmp_path / "out"
    with pytest.raises(D.ArchiveError, match=r"bomb\.zip: declares 2,147,483,648 uncompressed bytes, over the limit of 1,073,741,824"):
        extract_zip(zpath, out, max_bytes=1 << 30)
    assert not out.exists()
    with unittest.mock.patch.object(D.shutil, "disk_usage", return_value=types.SimpleNamespace(free=1000)), \
            pytest.raises(D.ArchiveError, match=r"declares 2,147,483,648 uncompressed bytes, only 1,000 free at"):
        extract_zip(zpath, out)
    assert not out.exists()


def test_extract_zip_stops_at_a_lying_size(tmp_path):
    """A member declaring 1,000 bytes that holds 100,000 writes no more than declared and fails as corrupt."""
    from pipelines.sources.downloads import CorruptArchive

    zpath = _zip_declaring(tmp_path / "liar.zip", "a.bin", b"x" * 100_000, 1000)
    with pytest.raises(CorruptArchive, match=r"liar\.zip: not a readable zip archive"):
        extract_zip(zpath, tmp_path / "out")
    assert (tmp_path / "out" / "a.bin").stat().st_size <= 1000


def test_extract_zip_refuses_duplicate_members(tmp_path):
    import warnings

    from pipelines.sources.downloads import ArchiveError

    zpath = tmp_path / "dup.zip"
    with warnings.catch_warnings(), zipfile.ZipFile(zpath, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns "Duplicate name" but writes it
        zf.writestr("d/a.txt", b"first")
        zf.writestr("d/a.txt", b"second, which would silently replace the first")
    with pytest.raises(ArchiveError, match=r"'d/a.txt' appears twice"):
        extract_zip(zpath, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_zip_unreadable_is_corrupt_archive(tmp_path):
    from pipelines.sources.downloads import CorruptArchive

    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CorruptArchive, match=r"bad\.zip: not a readable zip archive"):
        extract_zip(bad, tmp_path / "out")
