"""ADE20K (SceneParsing, 150 classes): ``ade20k``.

Layout, val count (2,000) and ``reduce_zero_label=True`` (0 = "other" -> ignored): reference/ovss.md §2.2 and
§2.8; train count (20,210) for probes: reference/probes.md §4.2
("ADE20K train (20,210 imgs)").
"""
from __future__ import annotations

from ..registry import DATASETS
from .base import DatasetSpec, SplitLayout


@DATASETS.register("ade20k")
class ADE20K(DatasetSpec):
    """ADE20K SceneParsing, 150 classes, 0 = other (ignored) (val 2,000; train 20,210 for probes)."""

    mmseg_type = "ADE20KDataset"
    num_classes = 150
    reduce_zero_label = True
    key = "ade20k"
    root_hint = "ADEChallengeData2016"
    how_to_get = "download ADEChallengeData2016.zip, extract it and pass the ADEChallengeData2016 folder as --root"
    splits = {
        "val": SplitLayout("images/validation", "annotations/validation", 2000),
        "train": SplitLayout("images/training", "annotations/training", 20210),
    }
