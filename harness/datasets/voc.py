"""PASCAL VOC 2012: ``voc21`` (with background) and ``voc20`` (background ignored).

Layout, split file, counts and mmseg classes: wangf3014/SCLIP@b56bd30 ``configs/cfg_voc21.py`` /
``cfg_voc20.py``; the 1,464-image ``train.txt`` split (no SBD aug) used by linear probes:
Jiawei-Yang/Denoising-ViT@82704df ``evaluation/configs/vitb_voc2012_linear_config.py``.
"""
from __future__ import annotations

from ..registry import DATASETS
from .base import DatasetSpec, SplitLayout

#: where VOC2012 comes from (mmsegmentation v1.2.2 docs/en/user_guides/2_dataset_prepare.md): standard palette PNGs,
#: 0 = background, 255 = object boundary (ignored); no SBD augmentation needed.
_VOC_HOW_TO_GET = (
    "download the PASCAL VOC 2012 trainval archive (VOCtrainval_11-May-2012.tar), extract it and pass its "
    "VOCdevkit/VOC2012 folder as --root"
)
_VOC_VAL = SplitLayout("JPEGImages", "SegmentationClass", 1449, "ImageSets/Segmentation/val.txt")
_VOC_TRAIN = SplitLayout("JPEGImages", "SegmentationClass", 1464, "ImageSets/Segmentation/train.txt")


@DATASETS.register("voc21")
class VOC21(DatasetSpec):
    """PASCAL VOC 2012, 21 classes incl. background (val 1,449; train 1,464 for probes)."""

    mmseg_type = "PascalVOCDataset"
    num_classes = 21
    reduce_zero_label = False
    key = "voc21"
    root_hint = "VOCdevkit/VOC2012"
    how_to_get = _VOC_HOW_TO_GET
    splits = {"val": _VOC_VAL, "train": _VOC_TRAIN}


@DATASETS.register("voc20")
class VOC20(DatasetSpec):
    """PASCAL VOC 2012 without background, 20 classes (bg ignored via reduce_zero_label; val 1,449)."""

    mmseg_type = "PascalVOC20Dataset"  # harness/datasets/_mmseg_extra.py (SCLIP's custom class)
    num_classes = 20
    reduce_zero_label = True
    key = "voc20"
    root_hint = "VOCdevkit/VOC2012"
    how_to_get = _VOC_HOW_TO_GET
    splits = {"val": _VOC_VAL}
