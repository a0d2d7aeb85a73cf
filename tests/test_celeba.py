"""CelebA 64x64 with attributes (pipelines/celeba.py, pipelines/sources/celeba.py): list readers, the crop rule,
the rendered sample (labels are properties of the pixels) and the dataset built from it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines import celeba as D
from pipelines import hfdata, images
from pipelines.sources import celeba as C

N_FACES = 24


def write_attr_file(path: Path, rows: list[str], count: int | None = None, names: str | None = None) -> Path:
    path.write_text(f"{len(rows) if count is None else count}\n{names or ' '.join(C.ATTRIBUTES)} \n"
                    + "".join(f"{r}\n" for r in rows))
    return path


def attr_row(name: str, ones: tuple[str, ...] = (), n: int = 40) -> str:
    return name + "".join(f" {1 if a in ones else -1:2d}" for a in C.ATTRIBUTES[:n])


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("celeba_sample")
    return root, C.write_sample(root, N_FACES, num_broken=2, seed=0)


@pytest.fixture(scope="module")
def built(sample, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("celeba_built") / "dataset"
    return out, D.build_celeba_dataset(sample[0], out, rows_per_file=7, source_note="the embedded sample")


# ------------------------------------------------------------------------------------------------ readers

def test_attribute_names_and_partitions_are_the_official_ones():
    assert len(C.ATTRIBUTES) == 40 == len(set(C.ATTRIBUTES))
    assert C.ATTRIBUTES[0] == "5_o_Clock_Shadow" and C.ATTRIBUTES[-1] == "Young"
    assert C.ATTRIBUTES.index("Smiling") == 31 and C.ATTRIBUTES.index("Male") == 20
    assert C.PARTITIONS == {0: "train", 1: "validation", 2: "test"}
    assert set(C.RENDERED_ATTRIBUTES) <= set(C.ATTRIBUTES)


def test_read_attributes_known_values(tmp_path):
    path = write_attr_file(tmp_path / "a.txt", [attr_row("000001.jpg", ("Smiling", "Young")),
                                                "000002.jpg" + " 1" * 40])  # single spaces work too
    names, rows = C.read_attributes(path)
    assert names == list(C.ATTRIBUTES) and list(rows) == ["000001.jpg", "000002.jpg"]
    first = rows["000001.jpg"]
    assert first.dtype == np.uint8 and first.shape == (40,)
    assert first.sum() == 2 and first[31] == 1 and first[39] == 1  # -1 -> 0, 1 -> 1
    assert rows["000002.jpg"].tolist() == [1] * 40


@pytest.mark.parametrize("rows, count, names, line, words", [
    ([attr_row("000001.jpg", n=39)], None, None, 3, "39 values"),
    ([attr_row("000001.jpg", n=39) + "  0"], None, None, 3, "'0' is not -1 or 1"),
    ([attr_row("000001.jpg"), attr_row("000001.jpg")], None, None, 4, "duplicate file name 000001.jpg"),
    ([attr_row("000001.jpg")], 2, None, 3, "says 2 rows, found 1"),
    ([attr_row("000001.jpg")], None, " ".join(C.ATTRIBUTES[::-1]), 2, "not CelebA's 40"),
    ([attr_row("000001.jpg")], None, " ".join(C.ATTRIBUTES[:39]) + " Happy", 2, "unknown ['Happy']"),
])
def test_read_attributes_errors_name_file_and_line(tmp_path, rows, count, names, line, words):
    path = write_attr_file(tmp_path / "bad.txt", rows, count, names)
    with pytest.raises(C.CelebAFormatError) as err:
        C.read_attributes(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and words in str(err.value)
    assert isinstance(err.value, ValueError)


def test_read_attributes_bad_count_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("many\n" + " ".join(C.ATTRIBUTES) + "\n")
    with pytest.raises(C.CelebAFormatError, match=rf"^{path}:1: expected the row count"):
        C.read_attributes(path)


def test_read_partition(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("000001.jpg 0\n000002.jpg  1\n000003.jpg 2\n\n")
    assert C.read_partition(path) == {"000001.jpg": "train", "000002.jpg": "validation", "000003.jpg": "test"}
    for text, line, words in (("000001.jpg 0\n000002.jpg 3\n", 2, "partition '3'"),
                              ("000001.jpg 0\n000001.jpg 1\n", 2, "duplicate file name"),
                              ("000001.jpg\n", 1, "got 1 fields")):
        path.write_text(text)
        with pytest.raises(C.CelebAFormatError, match=rf"^{path}:{line}: .*{words}"):
            C.read_partition(path)


def test_celeba_dir_accepts_root_or_subfolder_and_names_what_is_missing(sample, tmp_path):
    root, _ = sample
    assert C.celeba_dir(root) == root / "celeba"
    assert C.celeba_dir(root / "celeba") == root / "celeba"
    (tmp_path / "celeba").mkdir()
    (tmp_path / "celeba" / C.ATTR_FILE).write_text("0\n")
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt, img_align_celeba"):
        C.celeba_dir(tmp_path)


# ------------------------------------------------------------------------------------------------ crop rule

def test_square_resize_keeps_the_centred_square():
    img = np.zeros((218, 178, 3), np.uint8)
    img[:, :] = (0, 200, 0)
    img[:20] = img[-20:] = (255, 0, 0)
    out = D.square_resize(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.abs(out[2:-2, 2:-2].astype(int) - (0, 200, 0)).max() <= 1  # no red bleeds in
    one_more = img.copy()
    one_more[20] = (255, 0, 0)  # the square starts at row 20: painting it shows at the top
    assert D.square_resize(one_more, 64)[0, 32, 0] > 50
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255
    assert D.square_resize(wide, 10).min() == 255  # landscape: the centred columns
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        D.square_resize(np.zeros((8, 8), np.uint8))


# ------------------------------------------------------------------------------------------------ the sample

def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_sample_is_byte_identical_per_seed(tmp_path):
    a, b, c = (C.write_sample(tmp_path / n, 6, num_broken=2, seed=s) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    assert a == b and digests(tmp_path / "a") == digests(tmp_path / "b")
    da, dc = digests(tmp_path / "a"), digests(tmp_path / "c")
    assert da.keys() == dc.keys() and da["celeba/img_align_celeba/000001.jpg"] != dc["celeba/img_align_celeba/000001.jpg"]
    assert json.loads((tmp_path / "a" / "SOURCE.json").read_text())["broken"] == a["broken"]


def test_sample_layout_lists_and_broken_entries(sample):
    root, src = sample
    folder = root / "celeba"
    _, attrs = C.read_attributes(folder / C.ATTR_FILE)
    part = C.read_partition(folder / C.PARTITION_FILE)
    assert list(attrs) == list(part) == [f"{i:06d}.jpg" for i in range(1, N_FACES + 3)]
    assert src["broken"] == {"000025.jpg": images.MISSING_IMAGE, "000026.jpg": images.CORRUPT_IMAGE}
    assert src["rendered_attributes"] == list(C.RENDERED_ATTRIBUTES)
    for name, reason in src["broken"].items():
        with pytest.raises(images.ImageError) as err:
            images.read(folder / C.IMAGE_DIR / name)
        assert err.value.reason == reason
    arr, note = images.read(folder / C.IMAGE_DIR / "000001.jpg")
    assert arr.shape == (218, 178, 3) and note is None
    table = np.stack(list(attrs.values()))
    rendered = [C.ATTRIBUTES.index(a) for a in C.RENDERED_ATTRIBUTES]
    assert table[:, [i for i in range(40) if i not in rendered]].max() == 0  # the rest: -1 for every face
    assert all(0 < table[:, i].sum() < len(table) for i in rendered)  # every rendered one varies
    hair = table[:, [C.ATTRIBUTES.index(h) for h in C.HAIR_COLOURS]].sum(axis=1)
    assert hair.max() == 1 and (hair[table[:, C.ATTRIBUTES.index("Bald")] == 1] == 0).all()
    assert sorted(set(part.values())) == ["test", "train", "validation"]
    assert sum(v == "train" for v in part.values()) >= 0.7 * len(part)


def _at(img: np.ndarray, x: float, y: float, r: int = 1) -> np.ndarray:
    """Mean RGB of the (2r+1)^2 pixels of a 64x64 square_resize output around full-size point (x, y)."""
    i, j = int(round((y - 20) * 64 / 178)), int(round(x * 64 / 178))
    return img[i - r:i + r + 1, j - r:j + r + 1].reshape(-1, 3).astype(float).mean(axis=0)


def _measures(sample) -> list[tuple[dict, dict]]:
    """Per good face: (attributes, pixel measures on its 64x64 image at the regions write_sample documents)."""
    root, src = sample
    folder = root / "celeba"
    _, attrs = C.read_attributes(folder / C.ATTR_FILE)
    out = []
    for name, lay in src["layout"].items():
        img = D.square_resize(images.read(folder / C.IMAGE_DIR / name)[0])
        (cx, cy), (a, b) = lay["center"], lay["axes"]
        cheek = (_at(img, cx - 0.45 * a, cy + 0.15 * b) + _at(img, cx + 0.45 * a, cy + 0.15 * b)) / 2
        top = _at(img, cx, cy - 0.8 * b)
        j0, j1 = (int(round(x * 64 / 178)) for x in (cx - 0.38 * a, cx + 0.38 * a))
        i0, i1 = (int(round((y - 20) * 64 / 178)) for y in (cy + 0.4 * b, cy + 0.75 * b))
        mouth = img[i0:i1 + 1, j0:j1 + 1].reshape(-1, 3)
        jc = int(round(cx * 64 / 178))
        side = (_at(img, cx - 1.2 * a, cy + 0.1 * b) + _at(img, cx + 1.2 * a, cy + 0.1 * b)) / 2
        m = {"skin_brightness": cheek.mean(),
             "hat_hue": max(top[1], top[2]) - top[0],  # hats are blue/green/purple; hair and skin are not
             "bridge_over_skin": _at(img, cx, cy - 0.2 * b, 0).mean() / cheek.mean(),
             "teeth_pixels": int((mouth.min(axis=1) > 220).sum()),
             "mouth_min_red": int(img[i0:i1 + 1, jc - 1:jc + 2, 0].min()),
             "chin_vs_cheek": np.abs(_at(img, cx, cy + 0.9 * b) - cheek).mean(),
             "crown_vs_cheek": np.abs(top - cheek).mean(),
             "side_hair": min(C.HAIR_RGB, key=lambda h: np.abs(np.array(C.HAIR_RGB[h]) - side).sum())}
        out.append((dict(zip(C.ATTRIBUTES, attrs[name].tolist(), strict=True)), m))
    return out


def test_rendered_attributes_are_properties_of_the_pixels(sample):
    faces = _measures(sample)
    assert len(faces) == N_FACES

    def split(attr: str, key: str, where=lambda a: True) -> tuple[list, list]:
        on = [m[key] for a, m in faces if a[attr] and where(a)]
        off = [m[key] for a, m in faces if not a[attr] and where(a)]
        assert on and off, f"{attr}: the sample needs faces with and without it"
        return on, off

    on, off = split("Pale_Skin", "skin_brightness")
    assert min(on) > 195 > max(off)
    on, off = split("Wearing_Hat", "hat_hue")
    assert min(on) > 35 > 25 > max(off)
    on, off = split("Eyeglasses", "bridge_over_skin")  # the frame's bridge between the eyes is dark
    assert max(on) < 0.6 and min(off) > 0.85
    on, off = split("Smiling", "teeth_pixels")
    assert min(on) >= 2 and max(off) == 0
    on, off = split("Mouth_Slightly_Open", "mouth_min_red")  # the dark inside of the mouth
    assert max(on) < 70 < 100 < min(off)
    on, off = split("No_Beard", "chin_vs_cheek")  # No_Beard 0: the chin is beard, not skin
    assert max(on) < 12 and min(off) > 20
    on, off = split("Bald", "crown_vs_cheek", lambda a: not a["Wearing_Hat"])  # bald: the crown is skin
    assert max(on) < 8 and min(off) > 12
    for a, m in faces:
        if not a["Bald"]:
            assert m["side_hair"] == next((h for h in C.HAIR_COLOURS if a[h]), "other")


# ------------------------------------------------------------------------------------------------ the dataset

def test_build_counts_and_skips(sample, built):
    root, src = sample
    _, report = built
    part = C.read_partition(root / "celeba" / C.PARTITION_FILE)
    good = [f for f in part if f not in src["broken"]]
    assert report["rows"]["total"] == N_FACES == sum(report["rows"][s] for s in D.SPLITS)
    for s in D.SPLITS:
        assert report["rows"][s] == sum(part[f] == s for f in good)
    assert report["skipped"][images.MISSING_IMAGE] == 1 and report["skipped"][images.CORRUPT_IMAGE] == 1
    assert report["skipped_total"] == 2 and report["image_size"] == 64
    assert report["image_conversions"] == {}
    prev = report["prevalence"]["train"]
    assert set(prev) == set(C.ATTRIBUTES) and prev["Young"] == 0.0 and 0 < prev["Smiling"] < 1


def test_build_round_trips_through_datasets(sample, built, tmp_path):
    root, _ = sample
    out, _ = built
    _, attrs = C.read_attributes(root / "celeba" / C.ATTR_FILE)
    part = C.read_partition(root / "celeba" / C.PARTITION_FILE)
    for split in ("train", "validation", "test"):
        ds = hfdata.load_local_split(out, split, cache_dir=tmp_path / "cache")
        ids = ds["id"]
        assert ids == sorted(ids) and all(part[f"{i}.jpg"] == split for i in ids)
        for row in ds:
            assert row["image"].size == (64, 64) and row["image"].mode == "RGB"
            assert row["attributes"] == attrs[f"{row['id']}.jpg"].tolist() and row["split"] == split
    first = hfdata.load_local_split(out, "train", cache_dir=tmp_path / "cache")[0]
    expected = D.square_resize(images.read(root / "celeba" / C.IMAGE_DIR / f"{first['id']}.jpg")[0])
    assert np.array_equal(np.asarray(first["image"]), expected)  # PNG: lossless


def test_card_names_the_rule_license_and_attributes(built):
    out, report = built
    card = (out / hfdata.CARD).read_text()
    meta = hfdata.read_card_metadata(out / hfdata.CARD)
    assert meta["pretty_name"] == D.PRETTY_NAME and meta["license"] == "other"
    assert meta["task_categories"] == ["unconditional-image-generation"] and meta["tags"] == ["faces", "attributes"]
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == {
        s: report["rows"][s] for s in D.SPLITS}
    assert report["crop_rule"] in card and "218/178 = 1.22" in card and "non-commercial research" in card
    assert all(f"`{a}`" in card for a in C.ATTRIBUTES) and "the embedded sample" in card
    assert "| `Smiling` |" in card and "| `Young` |" not in card  # prevalence only of what varies
    assert "`missing_image` | 1 |" in card


def test_build_edge_cases(tmp_path):
    root = tmp_path / "src"
    C.write_sample(root, 12, num_broken=0, seed=5)
    folder = root / "celeba"
    lines = (folder / C.PARTITION_FILE).read_text().splitlines()
    assert lines[0] == "000001.jpg 0" and lines[9] == "000010.jpg 2"  # the only test entry
    kept = [line for i, line in enumerate(lines) if i not in (0, 9)]
    (folder / C.PARTITION_FILE).write_text("\n".join(kept + ["000000.jpg 0"]) + "\n")  # 2 unlisted, 1 unknown
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    report = D.build_celeba_dataset(folder, out)  # the lists' folder works as the root too
    assert not (out / "stale.txt").exists()
    assert report["skipped"][D.NO_PARTITION] == 2 and report["skipped"][D.NO_ATTRIBUTES] == 1
    assert report["rows"] == {"train": 9, "validation": 1, "test": 0, "total": 10}
    assert not list((out / "data").glob("test-*"))
    meta = hfdata.read_card_metadata(out / hfdata.CARD)
    assert [s["name"] for s in meta["dataset_info"]["splits"]] == ["train", "validation"]  # the empty split left out
    capped = D.build_celeba_dataset(root, out, max_per_split=3, image_size=32)
    assert capped["rows"] == {"train": 3, "validation": 1, "test": 0, "total": 4} and capped["image_size"] == 32
    ds = hfdata.load_local_split(out, "train", cache_dir=tmp_path / "cache")
    assert ds["id"] == ["000002", "000003", "000004"] and ds[0]["image"].size == (32, 32)
    with pytest.raises(FileNotFoundError, match="missing list_attr_celeba.txt"):
        D.build_celeba_dataset(tmp_path / "nowhere", tmp_path / "x")
