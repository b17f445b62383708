"""ADE20K (SceneParsing, 150 classes): ``ade20k``.

Layout, val count (2,000) and ``reduce_zero_label=True`` (0 = "other" -> ignored): the ``ADEChallengeData2016``
release (Zhou et al., "Scene Parsing through ADE20K Dataset", CVPR 2017) as read by mmseg's ``ADE20KDataset``
(mmsegmentation v1.2.2, docs/en/user_guides/2_dataset_prepare.md); train count: its ``images/training`` (20,210).
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
