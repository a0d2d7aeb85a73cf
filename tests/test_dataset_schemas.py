"""One schema per dataset, one box convention, one hash split rule: known answers and properties."""
import datasets
import numpy as np
import pytest

from pipelines import coco_humans, facesynthetics_dataset, headpose
from pipelines.faces.boxes import BOX_CONVENTION, face_box_from_landmarks, xywh_to_xyxy, xyxy_to_xywh
from pipelines.hfdata import DatasetSchema, hash_split, hash_split_rule

SCHEMAS = {"facesynthetics": facesynthetics_dataset.SCHEMA, "coco_humans": coco_humans.SCHEMA,
           "headpose": headpose.SCHEMA}
BOX_COLUMNS = {"facesynthetics": "face_box", "coco_humans": "face_boxes", "headpose": "face_box"}


# ------------------------------------------------------------------------------------------------ schemas


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_column_is_described_and_boxes_name_the_convention(name):
    schema = SCHEMAS[name]
    lines = schema.columns_markdown()
    assert [line.split("`")[1] for line in lines] == list(schema.features)
    assert BOX_CONVENTION in schema.descriptions[BOX_COLUMNS[name]]
    box = schema.features[BOX_COLUMNS[name]]
    inner = box.feature if name == "coco_humans" else box  # a list of boxes vs one box
    assert inner.length == 4 and inner.feature == datasets.Value("float32")


def test_schema_refuses_descriptions_that_do_not_match_the_columns():
    features = datasets.Features({"id": datasets.Value("string"), "x": datasets.Value("float32")})
    with pytest.raises(ValueError, match=r"missing \['x'\], not columns \['y'\]"):
        DatasetSchema(features, {"id": "the id", "y": "not a column"})
    assert DatasetSchema(features, {"x": "a float", "id": "the id"}).columns_markdown() == [
        "- `id`: the id", "- `x`: a float"]


# -------------------------------------------------------------------------------------------------- boxes


def test_box_conversions_known_answers_and_round_trip():
    assert xywh_to_xyxy([10, 20, 30, 40]).tolist() == [10, 20, 40, 60]
    assert xyxy_to_xywh([10, 20, 40, 60]).tolist() == [10, 20, 30, 40]
    boxes = np.random.default_rng(0).uniform(0, 500, (7, 3, 4))
    np.testing.assert_allclose(xyxy_to_xywh(xywh_to_xyxy(boxes)), boxes, atol=1e-9)
    with pytest.raises(ValueError, match="4 values"):
        xywh_to_xyxy([1, 2, 3])


def test_same_face_gives_the_same_xyxy_box_in_every_dataset():
    """A square face spanning (100, 120)-(180, 200): FaceSynthetics' landmark rule (margin 0) through the head-pose
    writer, and COCO's keypoint rule (scale 1, no minimum size), both store [100, 120, 180, 200]."""
    corners = np.array([[100.0, 120.0], [180.0, 200.0], [140.0, 160.0]])
    expected = [100.0, 120.0, 180.0, 200.0]
    xywh = face_box_from_landmarks(corners, margin=0)  # SPIGA's crop convention, as the annotate shards keep it
    assert xywh_to_xyxy(xywh).tolist() == expected  # what facesynthetics_dataset writes
    rows = headpose.label_face(np.zeros((68, 2)), np.zeros(6), xywh, 512, 512, {"yaw": 15.0, "pitch": 10.0})
    assert rows and all(r["face_box"].tolist() == expected for r in rows)
    keypoints = [v for x, y in corners for v in (x, y, 2)] + [0] * (51 - 9)
    rule = coco_humans.FaceBoxRule(min_face_keypoints=2, face_visibility=2, face_box_scale=1.0, min_face_size=0.0)
    assert coco_humans.face_boxes([{"keypoints": keypoints}], 640, 480, rule) == [expected]


# -------------------------------------------------------------------------------------------------- split


def test_hash_split_known_answers():
    # sha1: c 84a5..., a 86f7..., b e9d7...
    assert hash_split(["a", "b", "c"], 1) == {"a": "train", "b": "train", "c": "validation"}
    assert hash_split(["a", "b", "c"], 2) == {"a": "validation", "b": "train", "c": "validation"}
    ids = [f"{i:06d}" for i in range(10)]
    assert sorted(i for i, s in hash_split(ids, 3).items() if s == "validation") == ["000001", "000003", "000009"]


def test_hash_split_is_stable():
    ids = [f"{i:06d}" for i in range(200)]
    split = hash_split(ids, 20)
    assert list(split) == ids  # the input's order, each id once
    assert hash_split(ids[::-1], 20) == split and hash_split(ids + ids[:5], 20) == split  # order, repeats
    held = {i for i, s in split.items() if s == "validation"}
    assert len(held) == 20 and held < {i for i, s in hash_split(ids, 21).items() if s == "validation"}  # nested
    more = hash_split(ids + [f"{i:06d}" for i in range(200, 400)], 20)  # new ids only displace, never reshuffle:
    assert all(more[i] == "train" for i in ids if i not in held)  # no train id of before turns validation
    assert set(hash_split(ids[:3], 5).values()) == {"validation"} and set(hash_split(ids, 0).values()) == {"train"}
    with pytest.raises(ValueError, match="validation_count"):
        hash_split(ids, -1)


def test_hash_split_rule_sentence():
    assert hash_split_rule(1).startswith("`validation` holds the 1 id with the smallest sha1(id)")
    assert "the 5 ids" in hash_split_rule(5) and "hash_split" in hash_split_rule(5)
