"""COCO-Stuff-164k based datasets: ``coco_object`` (81 classes) and ``coco_stuff164k`` (171 classes).

Both read ``images/val2017`` and ``annotations/val2017`` with every file in the folder (no split file,
5,000 images; wangf3014/SCLIP@b56bd30 ``configs/cfg_coco_*.py``). COCO-Object's ``*_instanceTrainIds.png`` come
from the remap of the raw COCO-Stuff PNGs (SCLIP ``datasets/cvt_coco_object.py``, ``harness data prepare
coco_object``); COCO-Stuff's ``*_labelTrainIds.png`` from mmseg's ``tools/dataset_converters/coco_stuff164k.py``
(mmsegmentation v1.2.2, also ``harness data prepare coco_stuff``).
"""
from __future__ import annotations

from ..registry import DATASETS
from .base import DatasetSpec, SplitLayout

_COCO_DOWNLOAD = (
    "download COCO val2017 images into DIR/images/val2017 and the COCO-Stuff stuffthingmaps_trainval2017.zip "
    "into DIR/annotations (raw label PNGs in DIR/annotations/val2017)"
)
_COCO_VAL = SplitLayout("images/val2017", "annotations/val2017", 5000)


@DATASETS.register("coco_object")
class COCOObject(DatasetSpec):
    """COCO-Object: background + 80 things, remapped from COCO-Stuff-164k (val 5,000)."""

    mmseg_type = "COCOObjectDataset"  # harness/datasets/_mmseg_extra.py (SCLIP's custom class)
    num_classes = 81
    reduce_zero_label = False  # set explicitly in SCLIP's cfg_coco_object.py: 0 = background is scored
    seg_map_suffix = "_instanceTrainIds.png"
    key = "coco_object"
    root_hint = "coco_stuff164k"
    how_to_get = f"{_COCO_DOWNLOAD}, then run `harness data prepare coco_object --root DIR`"
    splits = {"val": _COCO_VAL}


@DATASETS.register("coco_stuff164k", aliases=("coco_stuff",))
class COCOStuff164k(DatasetSpec):
    """COCO-Stuff-164k, 171 classes (80 things + 91 stuff), 255 = unlabeled (val 5,000)."""

    mmseg_type = "COCOStuffDataset"
    num_classes = 171
    reduce_zero_label = False
    seg_map_suffix = "_labelTrainIds.png"
    key = "coco_stuff"
    root_hint = "coco_stuff164k"
    how_to_get = (
        f"{_COCO_DOWNLOAD}, then run `harness data prepare coco_stuff --root DIR` (same output as mmseg's "
        "tools/dataset_converters/coco_stuff164k.py)"
    )
    splits = {"val": _COCO_VAL}
