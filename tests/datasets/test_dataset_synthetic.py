"""The synthetic writers: real layouts, deterministic, non-square varied sizes, colour-coded classes."""
from __future__ import annotations

import filecmp
import glob
import os

import numpy as np
import pytest
from PIL import Image

from harness.errors import DataError
from harness.registry import DATASETS
from harness.synthetic.segmentation import DEMO_VOC_CLASSES, class_colour, write_demo_voc, write_synthetic_dataset


def test_deterministic(tmp_path) -> None:
    a = write_synthetic_dataset("ade20k", str(tmp_path / "a"), num_images=2, seed=3)
    b = write_synthetic_dataset("ade20k", str(tmp_path / "b"), num_images=2, seed=3)
    c = write_synthetic_dataset("ade20k", str(tmp_path / "c"), num_images=2, seed=4)
    rel = "annotations/validation/ADE_val_00000001.png"
    assert filecmp.cmp(os.path.join(a, rel), os.path.join(b, rel), shallow=False)
    assert not filecmp.cmp(os.path.join(a, rel), os.path.join(c, rel), shallow=False)


def test_sizes_are_varied_and_not_square(tmp_path) -> None:
    root = write_synthetic_dataset("voc21", str(tmp_path), num_images=6, size=(90, 120))
    shapes = [Image.open(p).size for p in sorted(glob.glob(os.path.join(root, "JPEGImages", "*.jpg")))]
    assert len(set(shapes)) > 1 and all(w != h for w, h in shapes)
    assert all(70 <= h <= 115 and 95 <= w <= 150 for w, h in shapes)


def test_raw_label_conventions(tmp_path) -> None:
    voc = write_synthetic_dataset("voc21", str(tmp_path), num_images=2)
    lab = Image.open(os.path.join(voc, "SegmentationClass", "2012_000000.png"))
    assert lab.mode == "P" and lab.getpalette()[3:6] == [128, 0, 0]  # VOC palette PNG
    arr = np.array(lab)
    assert {0, 255} <= set(arr.ravel().tolist()) and arr[(arr != 255)].max() <= 20
    city = write_synthetic_dataset("cityscapes", str(tmp_path), num_images=1)
    arr = np.array(Image.open(glob.glob(os.path.join(city, "gtFine/val/*/*_gtFine_labelTrainIds.png"))[0]))
    assert 255 in arr and arr[arr != 255].max() <= 18
    ade = write_synthetic_dataset("ade20k", str(tmp_path), num_images=1)
    arr = np.array(Image.open(os.path.join(ade, "annotations/validation/ADE_val_00000001.png")))
    assert 0 in arr and arr.max() <= 150


def test_colours_encode_classes(tmp_path) -> None:
    """Mean image colour of each labelled region is close to that class's fixed colour."""
    root = write_synthetic_dataset("context60", str(tmp_path), num_images=1)
    img = np.array(Image.open(os.path.join(root, "JPEGImages", "2010_000000.jpg")).convert("RGB")).astype(float)
    lab = np.array(Image.open(os.path.join(root, "SegmentationClassContext", "2010_000000.png")))
    for c in np.unique(lab):
        region = lab == c
        if region.sum() < 50:
            continue
        assert np.abs(img[region].mean(0) - np.array(class_colour(int(c)))).max() < 25


def test_demo_voc(tmp_path, load_pipeline) -> None:
    root = write_demo_voc(str(tmp_path), num_images=3, size=(60, 80), seed=1)
    assert root.endswith(os.path.join("VOCdevkit", "VOC2012"))
    ds = DATASETS.get("voc21").build(root, "val", load_pipeline)
    assert len(ds) == 3
    seen = set(np.unique(np.concatenate([s["gt_seg_map"].ravel() for s in ds])).tolist())
    assert seen <= {0, 255, *DEMO_VOC_CLASSES}


def test_writer_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="no synthetic writer"):
        write_synthetic_dataset("imagenet", str(tmp_path))
    with pytest.raises(DataError, match="no split 'train'"):
        write_synthetic_dataset("coco_object", str(tmp_path), split="train")
