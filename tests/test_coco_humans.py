"""Known answers of the COCO humans rule, masks and face boxes on the embedded sample and hand-built files."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipelines import coco_humans as H
from pipelines.sources import coco as S


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    S.write_coco_sample(root, seed=0)
    return root


def kept_and_reasons(coco, rule):
    """Image id -> 'kept' or the rule that removed it, one image at a time."""
    out = {}
    for iid in coco.imgs:
        reason, _ = H._check(coco.imgs[iid], H.person_annotations(coco, iid), rule)
        out[iid] = reason or "kept"
    return out


def test_sample_is_in_the_real_schema(sample):
    for kind in S.KINDS:
        for split in S.SPLITS:
            d = json.loads(S.annotation_path(sample, kind, split).read_text())
            assert {"info", "licenses", "images", "annotations"} <= set(d)
            assert {"file_name", "coco_url", "height", "width", "id"} <= set(d["images"][0])
    pk = json.loads(S.annotation_path(sample, "person_keypoints", "train").read_text())
    segs = [a["segmentation"] for a in pk["annotations"]]
    assert any(isinstance(s, list) for s in segs)
    assert any(isinstance(s, dict) and isinstance(s["counts"], list) for s in segs)  # uncompressed RLE
    assert any(isinstance(s, dict) and isinstance(s["counts"], str) for s in segs)  # compressed RLE
    assert any(a["iscrowd"] == 1 for a in pk["annotations"])
    assert all(len(a["keypoints"]) == 51 for a in pk["annotations"])
    assert pk["categories"][0]["keypoints"][:5] == ["nose", "left_eye", "right_eye", "left_ear", "right_ear"]
    inst = json.loads(S.annotation_path(sample, "instances", "train").read_text())
    assert any(a["category_id"] == 18 for a in inst["annotations"])
    assert not S.image_path(sample, "train", "000000000011.jpg").exists()  # the missing image
    assert S.image_path(sample, "train", "000000000001.jpg").is_file()


def test_rule_on_the_sample_gives_the_known_answers(sample):
    for split in S.SPLITS:
        coco = S.load_coco(S.annotation_path(sample, "person_keypoints", split))
        assert kept_and_reasons(coco, H.SelectionRule()) == S.SAMPLE_EXPECTED[split]
        result = H.select_images(coco, H.SelectionRule())
        expected = S.SAMPLE_EXPECTED[split]
        assert result["image_ids"] == sorted(i for i, r in expected.items() if r == "kept")
        assert list(result["removed"]) == list(H.RULES)
        assert result["removed"] == {r: sum(v == r for v in expected.values()) for r in H.RULES}
    train = H.select_images(S.load_coco(S.annotation_path(sample, "person_keypoints", "train")), H.SelectionRule())
    assert train["malformed_annotation_ids"] == S.SAMPLE_MALFORMED_ANNOTATION_IDS


def test_every_threshold_is_an_argument(sample):
    coco = S.load_coco(S.annotation_path(sample, "person_keypoints", "train"))
    base = H.SelectionRule()
    kept = lambda **kw: set(H.select_images(coco, H.SelectionRule(**{**base.to_dict(), **kw}))["image_ids"])  # noqa: E731
    assert kept() == {1, 2, 11, 12}
    assert 3 in kept(min_side=150)
    assert 5 in kept(allow_crowd=True)
    assert 6 in kept(max_persons=11, min_largest_person_fraction=0.0, min_person_area_fraction=0.0)
    assert 9 in kept(min_person_area_fraction=0.1)
    assert 8 in kept(min_largest_person_fraction=0.005, min_person_area_fraction=0.005)
    assert kept(min_face_keypoints=0) >= {1, 2, 7}
    assert kept(min_person_area_fraction=0.4) == {2}  # union 0.4395; the others are single persons below 0.4


def hand_built(persons):
    """A one-image COCO (100 x 80) with the given person annotations."""
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = {"images": [{"id": 7, "width": 100, "height": 80, "file_name": "x.jpg"}],
                    "annotations": persons, "categories": [{"id": 1, "name": "person"}]}
    import contextlib  # noqa: E401
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def person(ann_id, segm, area, kps=None, crowd=0):
    return {"id": ann_id, "image_id": 7, "category_id": 1, "iscrowd": crowd, "area": area, "segmentation": segm,
            "keypoints": kps or [0] * 51, "bbox": [0, 0, 1, 1]}


FACE = [50, 20, 2, 45, 18, 2, 55, 18, 2, 40, 20, 1, 60, 20, 1] + [0] * 36


def test_hand_built_rule_and_face_visibility():
    rule = H.SelectionRule(min_side=50, min_person_area_fraction=0.2, min_largest_person_fraction=0.1)
    poly = [[10, 10, 60, 10, 60, 70, 10, 70]]
    coco = hand_built([person(1, poly, 3000.0, FACE)])
    assert H.select_images(coco, rule)["image_ids"] == [7]
    assert H.select_images(coco, H.SelectionRule(**{**rule.to_dict(), "min_face_keypoints": 4}))["removed"]["no_visible_face"] == 1
    # visibility 1 (labelled, occluded) counts only with face_visibility=1: 5 face keypoints then
    rule1 = H.SelectionRule(**{**rule.to_dict(), "min_face_keypoints": 5, "face_visibility": 1})
    assert H.select_images(coco, rule1)["image_ids"] == [7]
    bad = hand_built([person(1, poly, 3000.0, FACE), person(2, [[1, 2, 3, 4]], 1.0)])
    r = H.select_images(bad, rule)
    assert r["image_ids"] == [] and r["removed"]["malformed_annotation"] == 1 and r["malformed_annotation_ids"] == [2]
    wrong_rle = hand_built([person(1, {"size": [10, 10], "counts": [100]}, 3000.0, FACE)])
    assert H.select_images(wrong_rle, rule)["removed"]["malformed_annotation"] == 1  # RLE of another size


def test_mask_union_pixel_counts_match_pycocotools(sample):
    coco = S.load_coco(S.annotation_path(sample, "person_keypoints", "train"))
    for iid in (1, 11, 12):  # one person: polygon, compressed RLE, two-part polygon
        anns = H.person_annotations(coco, iid)
        img = coco.imgs[iid]
        mask = H.person_mask(anns, img["height"], img["width"])
        assert mask.shape == (img["height"], img["width"]) and set(np.unique(mask)) <= {0, 1}
        assert int(mask.sum()) == int(anns[0]["area"]) == int(coco.annToMask(anns[0]).sum())
    anns = H.person_annotations(coco, 2)  # polygon 100 x 190 + uncompressed RLE 120 x 170, overlap 20 x 170
    mask = H.person_mask(anns, 256, 320)
    a, b = (coco.annToRLE(x) for x in anns)
    inter = mask_utils.area(mask_utils.merge([a, b], intersect=True))
    assert int(mask.sum()) == int(anns[0]["area"] + anns[1]["area"] - inter) == 19000 + 20400 - 3400


def test_face_boxes_from_known_keypoints():
    rule = H.FaceBoxRule(min_face_keypoints=2, face_visibility=2, face_box_scale=1.8, min_face_size=8)
    # nose (100, 50), eyes (90, 45) (110, 45), ears (80, 50) (120, 50): box 80..120 x 45..50, longer side 40
    kps = [100, 50, 2, 90, 45, 2, 110, 45, 2, 80, 50, 2, 120, 50, 2] + [0] * 36
    assert H.face_boxes([{"keypoints": kps}], 640, 480, rule) == [[64.0, 11.5, 136.0, 83.5]]
    # only the two eyes visible: spread 20 -> side 36, centred on (100, 45)
    two = [100, 50, 1, 90, 45, 2, 110, 45, 2, 80, 50, 0, 120, 50, 0] + [0] * 36
    assert H.face_boxes([{"keypoints": two}], 640, 480, rule) == [[82.0, 27.0, 118.0, 63.0]]
    assert H.face_boxes([{"keypoints": two}], 640, 480, H.FaceBoxRule(min_face_keypoints=3)) == []
    # clipped to the image; a crowd never gives a face
    edge = [2, 3, 2, 4, 2, 2] + [0] * 45
    assert H.face_boxes([{"keypoints": edge}], 640, 480, rule) == [[0.0, 0.0, 7.0, 6.5]]
    assert H.face_boxes([{"keypoints": kps, "iscrowd": 1}], 640, 480, rule) == []
    with pytest.raises(H.MalformedAnnotation):
        H.face_boxes([{"keypoints": [1, 2, 2]}], 640, 480, rule)


def test_features_and_row(sample):
    coco = S.load_coco(S.annotation_path(sample, "person_keypoints", "val"))
    caps = H.captions_by_image(S.load_coco(S.annotation_path(sample, "captions", "val")))
    img = coco.imgs[102]
    row = H.image_row(img, H.person_annotations(coco, 102), caps[102], np.zeros((256, 320, 3), np.uint8),
                      H.FaceBoxRule(), include_crowd=False)
    assert row["num_persons"] == 2 and len(row["face_boxes"]) == 1 and len(row["text"]) == 2 + 102 % 4
    assert row["person_mask"].max() == 255
    assert row["person_area_fraction"] == pytest.approx((row["person_mask"] > 0).mean())
    H.SCHEMA.features.encode_example(row)
