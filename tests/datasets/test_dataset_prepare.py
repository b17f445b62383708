"""Label preparation: COCO-Object / COCO-Stuff remaps, the pycocotools fallback and PASCAL Context."""
from __future__ import annotations

import ast
import glob
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from harness.errors import DataError
from harness.prepare import labels as prepare
from harness.registry import DATASETS
from harness.synthetic.segmentation import write_coco_instances, write_context_json, write_synthetic_dataset


def _mmseg_converter(name: str) -> str:
    spec = importlib.util.find_spec("mmseg")
    path = os.path.join(list(spec.submodule_search_locations)[0], ".mim", "tools", "dataset_converters", name)
    if not os.path.isfile(path):
        pytest.skip(f"mmseg converter {name} not shipped with this mmseg install")
    return path


def _assigned_literal(path: str, target: str):
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == target for t in node.targets):
            return node.value
    raise AssertionError(f"{target} not found in {path}")


# -- tables ---------------------------------------------------------------------------------------
def test_coco_stuff_table_equals_mmseg_converter() -> None:
    node = _assigned_literal(_mmseg_converter("coco_stuff164k.py"), "clsID_to_trID")
    assert ast.literal_eval(node) == prepare.coco_stuff_clsid_to_trid()


def test_context_mapping_equals_mmseg_converter() -> None:
    node = _assigned_literal(_mmseg_converter("pascal_context.py"), "_mapping")
    ids = ast.literal_eval(node.args[0].args[0])  # np.sort(np.array([...]))
    np.testing.assert_array_equal(np.sort(ids), prepare.CONTEXT_MAPPING)
    assert len(prepare.CONTEXT_MAPPING) == 60


def test_coco_object_remap_hand_computed() -> None:
    raw = np.array([[0, 1, 10, 12, 13, 24], [26, 89, 91, 181, 255, 0]], dtype=np.uint8)
    # things: trID + 1 (ids 11 and 25 are unused, so 12 -> 12, 26 -> 25, 89 -> 80); stuff and 255 -> 0
    expected = np.array([[1, 2, 11, 12, 13, 24], [25, 80, 0, 0, 0, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(prepare.remap_coco_object(raw), expected)
    stuff = np.array([[0, 1, 10, 11, 12, 23], [24, 79, 80, 170, 255, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(prepare.remap_coco_stuff(raw), stuff)


# -- COCO-Object from raw COCO-Stuff PNGs ---------------------------------------------------------
def test_prepare_coco_object_writes_files_and_skips_trainids(tmp_path) -> None:
    root = write_synthetic_dataset("coco_object", str(tmp_path), num_images=5, prepared=False)
    ann = os.path.join(root, "annotations", "val2017")
    hand = np.array([[0, 12, 91], [255, 89, 181]], dtype=np.uint8)
    Image.fromarray(hand).save(os.path.join(ann, "000000999999.png"))
    # an output of the other converter must not be converted again
    Image.fromarray(hand).save(os.path.join(ann, "000000999999_labelTrainIds.png"))
    os.makedirs(os.path.join(root, "images", "val2017"), exist_ok=True)
    summary = prepare.prepare_coco_object(root, workers=2)
    assert summary["written"] == {"val2017": 6} and summary["total_written"] == 6
    assert any("official split has 5000" in w for w in summary["warnings"])
    out = np.array(Image.open(os.path.join(ann, "000000999999_instanceTrainIds.png")))
    np.testing.assert_array_equal(out, [[1, 12, 0], [0, 80, 0]])
    assert not glob.glob(os.path.join(ann, "*TrainIds_instanceTrainIds.png"))
    for raw_path in glob.glob(os.path.join(ann, "0000000?????.png")):
        got = np.array(Image.open(raw_path.replace(".png", "_instanceTrainIds.png")))
        np.testing.assert_array_equal(got, prepare.remap_coco_object(np.array(Image.open(raw_path))))


def test_prepare_coco_object_then_build(tmp_path, load_pipeline) -> None:
    root = write_synthetic_dataset("coco_object", str(tmp_path), num_images=2, prepared=False)
    prepare.prepare_coco_object(root, workers=1)
    prepare.prepare_coco_stuff(root, workers=1)
    assert len(DATASETS.get("coco_object").build(root, "val", load_pipeline)) == 2
    assert len(DATASETS.get("coco_stuff164k").build(root, "val", load_pipeline)) == 2


def test_prepare_coco_object_missing_inputs(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        prepare.prepare_coco_object(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="stuffthingmaps_trainval2017.zip") as e:
        prepare.prepare_coco_object(str(tmp_path))
    assert os.path.join(str(tmp_path), "annotations", "val2017") in str(e.value)
    os.makedirs(tmp_path / "annotations" / "val2017")
    with pytest.raises(DataError, match="no raw COCO-Stuff label PNGs"):
        prepare.prepare_coco_object(str(tmp_path))


def test_prepare_coco_object_rejects_colour_pngs(tmp_path) -> None:
    ann = tmp_path / "annotations" / "val2017"
    os.makedirs(ann)
    Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8)).save(ann / "000000000001.png")
    with pytest.raises(DataError, match="not a single-channel 8-bit label map"):
        prepare.prepare_coco_object(str(tmp_path), workers=1)


# -- pycocotools fallback ---------------------------------------------------------------------------
def _rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def test_fallback_from_instances_hand_computed(tmp_path) -> None:
    h, w = 6, 8
    big = np.zeros((h, w), bool)
    big[:, :6] = True
    small = np.zeros((h, w), bool)
    small[1:3, 1:3] = True
    crowd = np.zeros((h, w), bool)
    crowd[:, 6:] = True
    crowd_counts = [6 * 6, 12]  # column-major: 36 zeros (cols 0-5), then 12 ones
    anns = [  # small listed first: painting in file order would let the big mask cover it
        {"id": 1, "image_id": 7, "category_id": 44, "segmentation": _rle(small), "area": 4.0, "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 5, "segmentation": _rle(big), "area": 36.0, "iscrowd": 0},
        {"id": 3, "image_id": 7, "category_id": 2, "segmentation": {"size": [h, w], "counts": crowd_counts},
         "area": 12.0, "iscrowd": 1},
    ]
    data = {"images": [{"id": 7, "file_name": "000000000007.jpg", "height": h, "width": w},
                       {"id": 8, "file_name": "000000000008.jpg", "height": 3, "width": 4}],
            "annotations": anns,
            "categories": [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}, {"id": 44, "name": "c"}]}
    jp = tmp_path / "instances_val2017.json"
    jp.write_text(json.dumps(data))
    summary = prepare.prepare_coco_object_from_instances(str(tmp_path), str(jp))
    assert summary["written"] == {"val2017": 2} and "not byte-identical" in summary["warnings"][0]
    out = np.array(Image.open(tmp_path / "annotations" / "val2017" / "000000000007_instanceTrainIds.png"))
    expected = np.zeros((h, w), np.uint8)
    expected[big] = 2  # category 5 = rank 1 of sorted [2, 5, 44] -> label 2
    expected[small] = 3  # smaller area painted last (on top)
    expected[crowd] = 1  # crowd regions included
    np.testing.assert_array_equal(out, expected)
    empty = np.array(Image.open(tmp_path / "annotations" / "val2017" / "000000000008_instanceTrainIds.png"))
    assert empty.shape == (3, 4) and not empty.any()


def test_fallback_on_synthetic_instances(tmp_path, load_pipeline) -> None:
    root, jp = write_coco_instances(str(tmp_path), num_images=3)
    prepare.prepare_coco_object_from_instances(root, jp)
    ds = DATASETS.get("coco_object").build(root, "val", load_pipeline)
    assert len(ds) == 3
    labels = np.unique(np.concatenate([s["gt_seg_map"].ravel() for s in ds]))
    assert labels.min() == 0 and set(labels.tolist()) <= {0, 1, 2, 3, 4}


def test_fallback_missing_json(tmp_path) -> None:
    with pytest.raises(DataError, match="instances file .* not found"):
        prepare.prepare_coco_object_from_instances(str(tmp_path), str(tmp_path / "instances_val2017.json"))


# -- PASCAL Context ------------------------------------------------------------------------------
def _context_json(tmp_path, extra_cat: int = 458) -> str:
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    os.makedirs(voc / "JPEGImages")
    for name, (h, w) in (("2008_000002", (4, 5)), ("2008_000003", (3, 3))):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
    a1 = np.zeros((4, 5), bool)
    a1[0:2, :] = True
    a2 = np.zeros((4, 5), bool)
    a2[1:4, 0:2] = True
    t1 = np.ones((3, 3), bool)
    data = {
        "images": [{"file_name": "2008_000002.jpg", "image_id": 2008000002, "height": 4, "width": 5, "phase": "val"},
                   {"file_name": "2008_000003.jpg", "image_id": 2008000003, "height": 3, "width": 3, "phase": "train"}],
        "annos_segmentation": [
            {"id": 10, "image_id": 2008000002, "category_id": 2, "segmentation": _rle(a1)},
            {"id": 11, "image_id": 2008000002, "category_id": extra_cat, "segmentation": _rle(a2)},
            {"id": 12, "image_id": 2008000003, "category_id": 9, "segmentation": _rle(t1)},
        ],
    }
    jp = tmp_path / "trainval_merged.json"
    jp.write_text(json.dumps(data))
    return str(jp)


def test_prepare_context_hand_computed(tmp_path) -> None:
    jp = _context_json(tmp_path)
    summary = prepare.prepare_context(str(tmp_path / "VOCdevkit"), jp, workers=1)  # parent folder accepted
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    assert summary["root"] == str(voc) and summary["written"] == {"train": 1, "val": 1}
    val = np.array(Image.open(voc / "SegmentationClassContext" / "2008_000002.png"))
    # raw 2 -> 1 (aeroplane), raw 458 -> 59 (wood, painted later so it wins the overlap), unannotated -> 0
    np.testing.assert_array_equal(val, [[1, 1, 1, 1, 1], [59, 59, 1, 1, 1], [59, 59, 0, 0, 0], [59, 59, 0, 0, 0]])
    train = np.array(Image.open(voc / "SegmentationClassContext" / "2008_000003.png"))
    assert (train == 2).all()  # raw 9 -> 2 (bag)
    assert (voc / "ImageSets" / "SegmentationContext" / "val.txt").read_text() == "2008_000002\n"
    assert (voc / "ImageSets" / "SegmentationContext" / "train.txt").read_text() == "2008_000003\n"
    assert summary["missing_images"] == {"train": 0, "val": 0}


def test_prepare_context_rejects_unmerged_ids(tmp_path) -> None:
    jp = _context_json(tmp_path, extra_cat=3)  # 3 is not one of the 60 PASCAL-Context ids
    with pytest.raises(DataError) as e:
        prepare.prepare_context(str(tmp_path / "VOCdevkit" / "VOC2010"), jp, workers=1)
    assert "2008_000002.jpg" in str(e.value) and "[3]" in str(e.value) and "trainval_merged.json" in str(e.value)


def test_prepare_context_round_trip_matches_synthetic_labels(tmp_path, load_pipeline) -> None:
    voc, jp = write_context_json(str(tmp_path / "a"), num_images=5)
    summary = prepare.prepare_context(voc, jp, workers=2)
    assert summary["written"] == {"train": 5, "val": 5}
    ref = write_synthetic_dataset("context60", str(tmp_path / "b"), num_images=5)
    for f in sorted(glob.glob(os.path.join(ref, "SegmentationClassContext", "*.png"))):
        got = np.array(Image.open(os.path.join(voc, "SegmentationClassContext", os.path.basename(f))))
        np.testing.assert_array_equal(got, np.array(Image.open(f)))
    assert len(DATASETS.get("context59").build(voc, "val", load_pipeline)) == 5


def test_prepare_context_missing_inputs(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        prepare.prepare_context(str(tmp_path / "nope"), "x.json")
    with pytest.raises(DataError, match="JPEGImages"):
        prepare.prepare_context(str(tmp_path), "x.json")
    os.makedirs(tmp_path / "JPEGImages")
    with pytest.raises(DataError, match="trainval_merged.json"):
        prepare.prepare_context(str(tmp_path), str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="annos_segmentation"):
        prepare.prepare_context(str(tmp_path), str(bad))
