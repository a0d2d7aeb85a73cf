"""Opening, checking and converting images (pipelines/images.py) and the readers built on it: known pixels."""
from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipelines import facesynthetics_dataset as D
from pipelines import images
from pipelines.sources import facesynthetics as fs

GRADIENT16 = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0, 257, ..., 65535: every 8-bit level


def raw_png(path: Path, width: int, height: int, bit_depth: int, color_type: int, pixels: np.ndarray | None) -> Path:
    """A PNG written byte by byte (any bit depth; ``pixels`` None: a header with an empty image stream)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"" if pixels is None else b"".join(b"\x00" + r.astype(">u2" if bit_depth == 16 else np.uint8).tobytes()
                                               for r in pixels)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type,
                                                                       0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def forbid_decoding(monkeypatch) -> None:
    """From now on, fail the test if any pixel data is decoded."""
    def refuse(self, *a, **k):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)


# ------------------------------------------------------------------------------------------ 16 bit

def test_sixteen_bit_grey_png_keeps_its_gradient(tmp_path):
    Image.fromarray(GRADIENT16).save(tmp_path / "g.png")  # a 16-bit grey PNG (Pillow opens it as I;16)
    arr = fs.read_image(tmp_path / "g.png", size=16)
    expected = (GRADIENT16 >> 8).astype(np.uint8)
    assert arr.dtype == np.uint8 and arr.shape == (16, 16, 3)
    assert np.array_equal(arr, np.repeat(expected[..., None], 3, axis=-1))  # 0..255, not all white
    assert len(np.unique(arr)) == 256
    _, note = images.read(tmp_path / "g.png")
    assert note == "I;16->RGB (>>8)"
    (tmp_path / "g.pgm").write_bytes(b"P5\n16 16\n65535\n" + GRADIENT16.astype(">u2").tobytes())  # opens as mode I
    assert np.array_equal(fs.read_image(tmp_path / "g.pgm"), arr)


def test_sixteen_bit_rgb_png_keeps_the_high_byte_and_is_re_encoded(tmp_path):
    rgb = np.stack([GRADIENT16, GRADIENT16[::-1], np.full_like(GRADIENT16, 0x12FF)], axis=-1)
    path = raw_png(tmp_path / "rgb48.png", 16, 16, 16, 2, rgb)
    arr, note = images.read(path, (16, 16))
    assert np.array_equal(arr, (rgb >> 8).astype(np.uint8)) and note == "RGB;16->RGB (>>8)"
    data, note = images.encode(path, (16, 16))
    assert data != path.read_bytes() and note == "RGB;16->RGB (>>8)"
    with Image.open(io.BytesIO(data)) as im:  # stored as an 8-bit RGB PNG
        assert im.mode == "RGB" and images._raw_mode(im) == "RGB"
        assert np.array_equal(np.asarray(im), (rgb >> 8).astype(np.uint8))


def test_sixteen_bit_grey_alpha_png(tmp_path):
    la = np.stack([GRADIENT16, np.full_like(GRADIENT16, 0x8000)], axis=-1)
    arr, note = images.read(raw_png(tmp_path / "la.png", 16, 16, 16, 4, la))
    assert np.array_equal(arr, np.repeat((GRADIENT16 >> 8).astype(np.uint8)[..., None], 3, axis=-1))
    assert ">>8" in note and "alpha dropped" in note


# ------------------------------------------------------------------------------------- other modes

def _palette_image() -> Image.Image:
    im = Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8), mode="P")
    im.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0, 0, 0, 200] + [0] * (256 - 4) * 3)
    return im


@pytest.mark.parametrize(("make", "expected", "note"), [
    (lambda: Image.new("RGBA", (2, 2), (10, 20, 30, 0)), (10, 20, 30), "RGBA->RGB (alpha dropped)"),
    (lambda: Image.new("LA", (2, 2), (77, 5)), (77, 77, 77), "LA->RGB (grey replicated, alpha dropped)"),
    (lambda: Image.new("L", (2, 2), 77), (77, 77, 77), "L->RGB (grey replicated)"),
    (lambda: Image.new("1", (2, 2), 1), (255, 255, 255), "1->RGB (black and white)"),
    (lambda: Image.new("CMYK", (2, 2), (255, 0, 0, 0)), (0, 255, 255), "CMYK->RGB (Pillow's CMYK conversion)"),
    (lambda: Image.new("RGB", (2, 2), (1, 2, 3)), (1, 2, 3), None),
])
def test_modes_convert_to_the_expected_rgb(tmp_path, make, expected, note):
    path = tmp_path / "x.png" if make().mode != "CMYK" else tmp_path / "x.tif"
    make().save(path)
    arr, got = images.read(path, (2, 2))
    assert arr.shape == (2, 2, 3) and arr.dtype == np.uint8
    assert {tuple(p) for p in arr.reshape(-1, 3)} == {expected} and got == note


def test_palette_images_take_their_colours(tmp_path):
    _palette_image().save(tmp_path / "p.png")
    arr, note = images.read(tmp_path / "p.png")
    assert arr.tolist() == [[[10, 20, 30], [200, 0, 0]], [[0, 200, 0], [0, 0, 200]]] and note == "P->RGB (palette)"


@pytest.mark.parametrize(("array", "mode"), [(np.full((2, 2), 0.5, np.float32), "F"),
                                             (np.full((2, 2), 70000, np.int32), "I")])
def test_float_and_32_bit_images_are_skipped_with_their_mode(tmp_path, array, mode):
    Image.fromarray(array).save(tmp_path / "x.tif")
    with pytest.raises(fs.SampleError) as e:
        fs.read_image(tmp_path / "x.tif")
    assert e.value.reason == fs.UNSUPPORTED_IMAGE_MODE and f"mode {mode} " in e.value.detail
    assert "x.tif" in e.value.detail


# ------------------------------------------------------------------------------------------ sizes

def test_wrong_size_is_refused_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(path)
    forbid_decoding(monkeypatch)
    for call in (lambda: fs.read_image(path, size=128), lambda: D._png(str(path), 128, images.RGB, False)):
        with pytest.raises(fs.SampleError) as e:
            call()
        assert e.value.reason == fs.WRONG_IMAGE_SIZE and "64x48" in str(e.value)


def test_huge_declared_size_is_refused_without_decoding(tmp_path, monkeypatch):
    path = raw_png(tmp_path / "bomb.png", 100_000, 100_000, 8, 2, None)  # a few bytes declaring 30 GB
    forbid_decoding(monkeypatch)
    for size in (512, None):  # against the expected size, and Pillow's decompression-bomb limit
        with pytest.raises(fs.SampleError) as e:
            fs.read_image(path, size=size)
        assert e.value.reason == fs.WRONG_IMAGE_SIZE and "bomb.png" in str(e.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the size check does not rely on Pillow's limit
    with pytest.raises(fs.SampleError) as e:
        fs.read_image(path, size=512)
    assert e.value.reason == fs.WRONG_IMAGE_SIZE and "100000x100000" in str(e.value)


# ------------------------------------------------------------------------------------ segmentation

def test_segmentation_keeps_class_indices(tmp_path):
    _palette_image().save(tmp_path / "p_seg.png")
    assert fs.read_segmentation(tmp_path / "p_seg.png", size=2).tolist() == [[0, 1], [2, 3]]  # indices, not grey
    Image.fromarray(np.array([[0, 18], [255, 3]], np.uint16)).save(tmp_path / "i16_seg.png")
    assert fs.read_segmentation(tmp_path / "i16_seg.png").tolist() == [[0, 18], [255, 3]]  # not >> 8
    Image.fromarray(np.array([[0, 300]], np.uint16)).save(tmp_path / "big_seg.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb_seg.png")
    for name in ("big_seg.png", "rgb_seg.png"):
        with pytest.raises(fs.SampleError) as e:
            fs.read_segmentation(tmp_path / name)
        assert e.value.reason == fs.UNSUPPORTED_SEGMENTATION_MODE and name in e.value.detail


def _sample(tmp_path: Path, size: int = 32) -> fs.FaceSample:
    s = fs.sample_paths(tmp_path, "000000")
    Image.new("RGB", (size, size), (5, 6, 7)).save(s.image_path)
    Image.fromarray(np.full((size, size), 3, np.uint8), mode="L").save(s.segmentation_path)
    return s


def _build(s: fs.FaceSample, size: int = 32):
    landmarks = np.tile(np.linspace(4, 28, 68, dtype=np.float32)[:, None], (1, 2))
    return D._build(D._Job(s.id, str(s.image_path), str(s.segmentation_path), landmarks, size, 2))


def test_corrupt_segmentation_and_corrupt_image_have_their_own_reasons(tmp_path):
    s = _sample(tmp_path)
    assert _build(s)[2] is None
    good_seg = s.segmentation_path.read_bytes()
    s.segmentation_path.write_bytes(good_seg[: len(good_seg) // 2])
    assert _build(s)[2] == fs.CORRUPT_SEGMENTATION
    with pytest.raises(fs.SampleError) as e:
        fs.read_segmentation(s.segmentation_path)
    assert e.value.reason == fs.CORRUPT_SEGMENTATION
    s.segmentation_path.unlink()
    assert _build(s)[2] == fs.MISSING_SEGMENTATION
    s = _sample(tmp_path)
    s.image_path.write_bytes(s.image_path.read_bytes()[:60])
    assert _build(s)[2] == fs.CORRUPT_IMAGE


def test_assemble_row_converts_a_sixteen_bit_image(tmp_path):
    s = _sample(tmp_path)
    kept = s.image_path.read_bytes()
    assert _build(s)[1]["image"]["bytes"] == kept and _build(s)[3] == []  # 8-bit RGB PNG: its own bytes
    g = np.repeat(np.repeat(GRADIENT16, 2, axis=0), 2, axis=1)  # 32 x 32
    Image.fromarray(g).save(s.image_path)
    _, parts, reason, notes = _build(s)
    assert reason is None and notes == ["image: I;16->RGB (>>8)"]
    with Image.open(io.BytesIO(parts["image"]["bytes"])) as im:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im)[..., 1], (g >> 8).astype(np.uint8))


def test_describe_conversions():
    text = images.describe_conversions({"image: I;16->RGB (>>8)": 2}, labels=True)
    assert ">> 8" in text and "alpha is dropped" in text and "`image: I;16->RGB (>>8)`: 2" in text
    assert "Segmentation class-index maps" in text
    assert "No image needed converting" in images.describe_conversions({})


# ------------------------------------------------------------------------------------------- COCO

def test_coco_assemble_converts_and_counts_through_the_same_opener(tmp_path):
    import datasets

    from pipelines import coco_humans as H
    from pipelines.sources import coco as S

    root = tmp_path / "coco"
    S.write_coco_sample(root, seed=0)
    kept_jpeg = S.image_path(root, "train", f"{12:012d}.jpg").read_bytes()
    size = Image.open(S.image_path(root, "train", f"{1:012d}.jpg")).size
    grey16 = np.full(size[::-1], 0x4D00, np.uint16)
    Image.fromarray(grey16).save(S.image_path(root, "train", f"{1:012d}.jpg"), format="PNG")  # 16-bit grey
    Image.fromarray(np.zeros(size[::-1], np.float32)).save(S.image_path(root, "train", f"{2:012d}.jpg"), format="TIFF")
    Image.new("RGB", (8, 8)).save(S.image_path(root, "val", f"{101:012d}.jpg"))  # not the annotated size
    rule = H.SelectionRule()
    splits = {s: H.select_images(S.load_coco(S.annotation_path(root, "person_keypoints", s)), rule) for s in S.SPLITS}
    assert splits["train"]["image_ids"] == [1, 2, 11, 12] and splits["val"]["image_ids"] == [101, 102]
    splits["train"]["image_ids"] = [1, 2, 12]
    selection = {"rule": rule.to_dict(), "splits": splits}
    report = H.assemble_coco_humans(selection, root, root, tmp_path / "out", H.FaceBoxRule(), 8, S.load_coco)
    assert report["skipped"]["train"] == {"missing_image": 0, "corrupt_image": 0, "wrong_image_size": 0,
                                          "unsupported_image_mode": 1, "malformed_annotation": 0}
    assert report["skipped"]["validation"]["wrong_image_size"] == 1
    assert report["image_conversions"] == {"I;16->RGB (>>8)": 1}  # counted, and the card says so
    assert "`I;16->RGB (>>8)`: 1" in (tmp_path / "out" / "README.md").read_text()
    ds = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds["image_id"] == [1, 12]
    ds = ds.cast_column("image", datasets.Image(decode=False))
    with Image.open(io.BytesIO(ds[0]["image"]["bytes"])) as im:  # converted: 8-bit RGB, 0x4D00 >> 8 = 77
        assert im.mode == "RGB" and {tuple(p) for p in np.asarray(im).reshape(-1, 3)} == {(77, 77, 77)}
    assert ds[1]["image"]["bytes"] == kept_jpeg  # an RGB JPEG keeps its own bytes


# --------------------------------------------------------------------------------- headpose photos

def test_headpose_photos_reads_folders_and_hub_images_through_the_same_opener(tmp_path, monkeypatch):
    import datasets

    from stages import headpose_photos as P

    Image.fromarray(GRADIENT16).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    cfg = P.HeadposePhotosConfig(name="t", source="folder", direction_thresholds=P.DirectionThresholds(15.0, 10.0),
                                 detector_threshold=0.5, detector_upsample=0, multiple_faces_dominance=2.0,
                                 batch_size=2, rows_per_file=8, folder=str(tmp_path))
    got = dict(P.iter_images(cfg, tmp_path))
    assert np.array_equal(got["a.png"][..., 0], (GRADIENT16 >> 8).astype(np.uint8)) and got["b.png"] is None
    hub = [{"image": Image.fromarray(GRADIENT16)}, {"image": Image.fromarray(np.zeros((2, 2), np.float32))}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub)
    got = [a for _, a in P.iter_images(dataclasses.replace(cfg, source="hf", hf_dataset="x/y"), None)]
    assert np.array_equal(got[0][..., 2], (GRADIENT16 >> 8).astype(np.uint8)) and got[1] is None  # F: skipped
