"""PASCAL Context: ``context60`` (background counted) and ``context59`` (background ignored).

Layout, split file, val count (5,105) and label convention (0 = background, 1..59 classes, written by
the ``_mapping``/``np.digitize`` converter): mmsegmentation v1.2.2 ``tools/dataset_converters/pascal_context.py``
and wangf3014/SCLIP@b56bd30 ``configs/cfg_context{59,60}.py``. The label maps are not part of
any download; ``harness data prepare context`` builds them from ``trainval_merged.json``.
"""
from __future__ import annotations

from ..registry import DATASETS
from .base import DatasetSpec, SplitLayout

_CONTEXT_HOW_TO_GET = (
    "download the PASCAL VOC 2010 trainval archive and the PASCAL-Context trainval_merged.json, then run "
    "`harness data prepare context --root DIR/VOCdevkit/VOC2010 --json trainval_merged.json`"
)
_CONTEXT_VAL = SplitLayout("JPEGImages", "SegmentationClassContext", 5105, "ImageSets/SegmentationContext/val.txt")


@DATASETS.register("context60")
class Context60(DatasetSpec):
    """PASCAL Context, 60 classes incl. background (val 5,105)."""

    mmseg_type = "PascalContextDataset"
    num_classes = 60
    reduce_zero_label = False
    key = "context60"
    root_hint = "VOCdevkit/VOC2010"
    how_to_get = _CONTEXT_HOW_TO_GET
    splits = {"val": _CONTEXT_VAL}


@DATASETS.register("context59")
class Context59(DatasetSpec):
    """PASCAL Context, 59 classes, background ignored via reduce_zero_label (val 5,105)."""

    mmseg_type = "PascalContextDataset59"
    num_classes = 59
    reduce_zero_label = True
    key = "context59"
    root_hint = "VOCdevkit/VOC2010"
    how_to_get = _CONTEXT_HOW_TO_GET
    splits = {"val": _CONTEXT_VAL}
