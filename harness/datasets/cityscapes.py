"""Cityscapes (19 train ids): ``cityscapes``.

Layout, suffixes and counts (2,975 train / 500 val): Cordts et al., "The Cityscapes Dataset", CVPR 2016, and
mmseg's ``CityscapesDataset`` (mmsegmentation v1.2.2, docs/en/user_guides/2_dataset_prepare.md). Image ids
include the city folder (``frankfurt/frankfurt_000000_000294``), which :meth:`DatasetSpec.image_ids` keeps as
a relative path, exactly like mmseg's recursive file listing.
"""
from __future__ import annotations

from ..registry import DATASETS
from .base import DatasetSpec, SplitLayout


@DATASETS.register("cityscapes")
class Cityscapes(DatasetSpec):
    """Cityscapes fine annotations, 19 classes, 255 = void (val 500; train 2,975 for probes)."""

    mmseg_type = "CityscapesDataset"
    num_classes = 19
    reduce_zero_label = False
    img_suffix = "_leftImg8bit.png"
    seg_map_suffix = "_gtFine_labelTrainIds.png"
    key = "cityscapes"
    root_hint = "cityscapes"
    how_to_get = (
        "download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into DIR, then write the "
        "*_gtFine_labelTrainIds.png files with mmseg's tools/dataset_converters/cityscapes.py DIR "
        "(needs `pip install cityscapesscripts`)"
    )
    splits = {
        "val": SplitLayout("leftImg8bit/val", "gtFine/val", 500),
        "train": SplitLayout("leftImg8bit/train", "gtFine/train", 2975),
    }
