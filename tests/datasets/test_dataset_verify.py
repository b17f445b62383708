"""``verify`` / ``check`` messages and the per-sample label checks name the file and the fix."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from harness.datasets.base import check_sample_shapes
from harness.errors import DataError
from harness.registry import DATASETS
from harness.synthetic.segmentation import write_synthetic_dataset


def test_verify_ok_except_official_count(tmp_path) -> None:
    root = write_synthetic_dataset("voc21", str(tmp_path), num_images=3)
    problems = DATASETS.get("voc21").verify(root, "val")
    assert problems == ["found 3 val images, the official voc21 val split has 1449"]


def test_verify_missing_root(tmp_path) -> None:
    problems = DATASETS.get("ade20k").verify(str(tmp_path / "ADE"), "val")
    assert len(problems) == 1 and "does not exist" in problems[0] and "ADEChallengeData2016" in problems[0]


def test_verify_missing_label_folder(tmp_path) -> None:
    root = write_synthetic_dataset("coco_object", str(tmp_path), num_images=2)
    shutil.rmtree(os.path.join(root, "annotations"))
    problems = DATASETS.get("coco_object").verify(root, "val", check_count=False)
    assert any(p.startswith("missing label maps folder") and "annotations/val2017" in p for p in problems)
    assert any("harness data prepare coco_object" in p for p in problems)


def test_verify_missing_split_file(tmp_path) -> None:
    root = write_synthetic_dataset("context60", str(tmp_path), num_images=2)
    os.remove(os.path.join(root, "ImageSets", "SegmentationContext", "val.txt"))
    problems = DATASETS.get("context60").verify(root, "val", check_count=False)
    assert any("missing split file" in p and "val.txt" in p for p in problems)
    assert any("harness data prepare context" in p for p in problems)


def test_verify_missing_label_maps(tmp_path) -> None:
    root = write_synthetic_dataset("coco_object", str(tmp_path), num_images=3, prepared=False)
    problems = DATASETS.get("coco_object").verify(root, "val", check_count=False)
    assert len(problems) == 1
    assert problems[0].startswith("3 label maps missing in") and "_instanceTrainIds.png" in problems[0]
    assert "harness data prepare coco_object" in problems[0]
    with pytest.raises(DataError, match="coco_object at .* is not usable"):
        DATASETS.get("coco_object").build(root)


def test_verify_missing_one_image(tmp_path) -> None:
    root = write_synthetic_dataset("ade20k", str(tmp_path), num_images=3)
    os.remove(os.path.join(root, "annotations", "validation", "ADE_val_00000002.png"))
    problems = DATASETS.get("ade20k").verify(root, "val", check_count=False)
    assert problems == [
        f"1 label maps missing in {os.path.join(root, 'annotations/validation')}, e.g. ADE_val_00000002.png "
        f"({DATASETS.get('ade20k').how_to_get})"
    ]


def test_verify_empty_image_folder(tmp_path) -> None:
    root = write_synthetic_dataset("cityscapes", str(tmp_path), num_images=1)
    shutil.rmtree(os.path.join(root, "leftImg8bit", "val"))
    os.makedirs(os.path.join(root, "leftImg8bit", "val"))
    problems = DATASETS.get("cityscapes").verify(root, "val", check_count=False)
    assert len(problems) == 1 and "no val images" in problems[0] and "_leftImg8bit.png" in problems[0]


def test_verify_suggests_nested_root(tmp_path) -> None:
    write_synthetic_dataset("voc21", str(tmp_path), num_images=1)
    problems = DATASETS.get("voc21").verify(str(tmp_path), "val")
    nested = os.path.join(str(tmp_path), "VOCdevkit", "VOC2012")
    assert f"pass --root {nested}" in " ".join(problems)


def _shrink_label(path: str) -> None:
    lab = Image.open(path)
    lab.resize((lab.width // 2, lab.height // 2), Image.NEAREST).save(path)


def test_wrong_size_label_map_one_clear_message(tmp_path, load_pipeline) -> None:
    spec = DATASETS.get("voc21")
    root = write_synthetic_dataset("voc21", str(tmp_path), num_images=2)
    img = os.path.join(root, "JPEGImages", "2012_000001.jpg")
    seg = os.path.join(root, "SegmentationClass", "2012_000001.png")
    h, w = np.array(Image.open(seg)).shape
    _shrink_label(seg)
    with pytest.raises(DataError) as e:
        spec.check_label_map(img, seg)
    msg = str(e.value)
    assert seg in msg and img in msg
    assert f"{h // 2}x{w // 2} (HxW)" in msg and f"{h}x{w} (HxW)" in msg
    # building the dataset screens every sample first: the same sizes, named before any work
    with pytest.raises(DataError, match=f"{h // 2}x{w // 2} \\(HxW\\) but its image"):
        spec.build(root, "val", load_pipeline)
    # the same check on loaded arrays, as the evaluator calls it per sample
    with pytest.raises(DataError, match="must have exactly its image's size"):
        check_sample_shapes(img, seg, np.array(Image.open(img)).shape, np.array(Image.open(seg)).shape)
    check_sample_shapes("a.jpg", "a.png", (5, 7, 3), (5, 7))  # equal sizes pass


def test_swapped_size_hint() -> None:
    with pytest.raises(DataError, match="EXIF rotation"):
        check_sample_shapes("a.jpg", "a.png", (100, 60), (60, 100))


def test_missing_files_in_check_label_map(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        DATASETS.get("ade20k").check_label_map(str(tmp_path / "x.jpg"), str(tmp_path / "x.png"))


def test_label_values_outside_classes(tmp_path) -> None:
    spec = DATASETS.get("coco_stuff164k")
    raw = np.array([[0, 170, 255], [181, 175, 3]], dtype=np.uint8)
    with pytest.raises(DataError) as e:
        spec.check_label_values("x_labelTrainIds.png", raw)
    assert "[175, 181]" in str(e.value) and "x_labelTrainIds.png" in str(e.value)
    spec.check_label_values("ok.png", np.array([[0, 170, 255]], dtype=np.uint8))
