"""Every registered OVSS dataset builds with the real mmseg class on its synthetic data."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from harness.errors import DataError
from harness.registry import DATASETS
from harness.synthetic.segmentation import SYNTHETIC_NAMES, write_synthetic_dataset

# name -> (key, num_classes, reduce_zero_label, mmseg class, official val count): wangf3014/SCLIP@b56bd30
# configs/cfg_*.py and custom_datasets.py, and each dataset's official val split
EXPECTED = {
    "voc21": ("voc21", 21, False, "PascalVOCDataset", 1449),
    "voc20": ("voc20", 20, True, "PascalVOC20Dataset", 1449),
    "context60": ("context60", 60, False, "PascalContextDataset", 5105),
    "context59": ("context59", 59, True, "PascalContextDataset59", 5105),
    "coco_object": ("coco_object", 81, False, "COCOObjectDataset", 5000),
    "coco_stuff164k": ("coco_stuff", 171, False, "COCOStuffDataset", 5000),
    "cityscapes": ("cityscapes", 19, False, "CityscapesDataset", 500),
    "ade20k": ("ade20k", 150, True, "ADE20KDataset", 2000),
}
TRAIN_COUNTS = {"voc21": 1464, "ade20k": 20210, "cityscapes": 2975}


def _raw_to_loaded(raw: np.ndarray, reduce_zero_label: bool) -> np.ndarray:
    """What mmseg must load from a raw label PNG: reduce_zero_label maps 0 -> 255 and subtracts 1."""
    if not reduce_zero_label:
        return raw
    return np.where((raw == 0) | (raw == 255), 255, raw.astype(np.int32) - 1).astype(np.uint8)


def test_all_ovss_datasets_registered() -> None:
    names = set(DATASETS.names())
    assert set(EXPECTED) <= names
    assert set(SYNTHETIC_NAMES) == set(EXPECTED)
    assert DATASETS.canonical("coco_stuff") == "coco_stuff164k"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_spec_attributes(name: str) -> None:
    key, ncls, rzl, mm_type, count = EXPECTED[name]
    spec = DATASETS.get(name)
    assert (spec.key, spec.num_classes, spec.reduce_zero_label, spec.mmseg_type) == (key, ncls, rzl, mm_type)
    assert spec.split("val").count == count
    assert spec.root_hint and spec.how_to_get
    assert len(spec.class_names) == ncls  # the mmseg class's METAINFO agrees with num_classes
    if name in TRAIN_COUNTS:
        assert spec.split("train").count == TRAIN_COUNTS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_build_and_labels_match_raw_files(name: str, tmp_path, load_pipeline) -> None:
    spec = DATASETS.get(name)
    root = write_synthetic_dataset(name, str(tmp_path), num_images=3)
    assert spec.verify(root, "val", check_count=False) == []
    ds = spec.build(root, "val", load_pipeline)
    assert len(ds) == 3
    assert ds.reduce_zero_label is spec.reduce_zero_label
    assert type(ds).__name__ == spec.mmseg_type
    for i in range(len(ds)):
        sample = ds[i]
        raw = np.array(Image.open(sample["seg_map_path"]))
        assert raw.ndim == 2
        np.testing.assert_array_equal(sample["gt_seg_map"], _raw_to_loaded(raw, spec.reduce_zero_label))
        assert sample["img"].shape[:2] == sample["gt_seg_map"].shape
        spec.check_label_values(sample["seg_map_path"], sample["gt_seg_map"])
        spec.check_label_map(sample["img_path"], sample["seg_map_path"])


def test_reduce_zero_label_examples(tmp_path, load_pipeline) -> None:
    """Background/other (0) becomes ignore (255) and class k becomes k-1 for voc20, context59, ade20k."""
    root = write_synthetic_dataset("voc21", str(tmp_path), num_images=2)
    s21 = DATASETS.get("voc21").build(root, "val", load_pipeline)[0]
    s20 = DATASETS.get("voc20").build(root, "val", load_pipeline)[0]
    raw = s21["gt_seg_map"]
    assert (raw == 0).any() and (raw == 255).any()
    assert (s20["gt_seg_map"][raw == 0] == 255).all()
    assert (s20["gt_seg_map"][raw == 255] == 255).all()
    obj = (raw > 0) & (raw < 255)
    np.testing.assert_array_equal(s20["gt_seg_map"][obj], raw[obj] - 1)


def test_coco_object_has_no_ignore_label(tmp_path, load_pipeline) -> None:
    root = write_synthetic_dataset("coco_object", str(tmp_path), num_images=3)
    for s in DATASETS.get("coco_object").build(root, "val", load_pipeline):
        assert s["gt_seg_map"].max() <= 80  # stuff and unlabeled (255) are background 0
    raw = np.array(Image.open(s["seg_map_path"].replace("_instanceTrainIds", "")))
    assert (raw == 255).any()


@pytest.mark.parametrize("name", sorted(TRAIN_COUNTS))
def test_train_splits_build(name: str, tmp_path, load_pipeline) -> None:
    spec = DATASETS.get(name)
    root = write_synthetic_dataset(name, str(tmp_path), num_images=2, split="train")
    ds = spec.build(root, "train", load_pipeline)
    assert len(ds) == 2 and not ds.test_mode


def test_cityscapes_ids_keep_city_folders(tmp_path) -> None:
    spec = DATASETS.get("cityscapes")
    root = write_synthetic_dataset("cityscapes", str(tmp_path), num_images=4)
    ids = spec.image_ids(root, "val")
    assert ids[0].startswith("frankfurt" + os.sep) and len({i.split(os.sep)[0] for i in ids}) == 3
    ds = spec.build(root, "val")
    assert sorted(os.path.relpath(d["img_path"], os.path.join(root, "leftImg8bit/val")) for d in ds.data_list) == [
        i + "_leftImg8bit.png" for i in ids
    ]


def test_limit_and_unknown_split(tmp_path) -> None:
    spec = DATASETS.get("ade20k")
    root = write_synthetic_dataset("ade20k", str(tmp_path), num_images=4)
    assert len(spec.build(root, "val", limit=2)) == 2
    with pytest.raises(DataError, match="no split 'test'"):
        spec.build(root, "test")


def test_build_on_missing_root_is_a_data_error(tmp_path) -> None:
    with pytest.raises(DataError) as e:
        DATASETS.get("voc21").build(str(tmp_path / "nowhere"))
    assert "does not exist" in str(e.value) and "VOCdevkit/VOC2012" in str(e.value)
