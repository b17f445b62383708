"""The ``ovss/phreg`` protocol is PH-Reg's Table S.5 (plus NACLIP's defaults for everything else).

Table S.5 of PH-Reg (arXiv 2505.21501, Appendix C.1, "Dataset specific details for zero-shot
open-vocabulary semantic segmentation"), copied by hand:

    Dataset            VOC21  PC60  Object  VOC20  PC59  Stuff  City  ADE
    Resize resolution    448   448     336    336   448    448   560  448
    Crop size            336   336     336    336   336    336   224  336
    Stride               112   112     112    112   112    112   112  112

"All other settings follow their default configurations": NACLIP/SCLIP's slide inference, logit scale
40 and probability threshold 0.1 on the three datasets with a background class (0 elsewhere).
"""
from __future__ import annotations

import pytest

from harness.protocols import get_protocol

# dataset: (resize, crop, stride) -- PH-Reg Table S.5, column order of the paper
TABLE_S5 = {
    "voc21": (448, 336, 112),
    "context60": (448, 336, 112),
    "coco_object": (336, 336, 112),
    "voc20": (336, 336, 112),
    "context59": (448, 336, 112),
    "coco_stuff164k": (448, 336, 112),
    "cityscapes": (560, 224, 112),
    "ade20k": (448, 336, 112),
}
WITH_BACKGROUND = {"voc21", "context60", "coco_object"}


@pytest.fixture(scope="module")
def proto():
    return get_protocol("ovss", "phreg")


def test_covers_exactly_the_eight_datasets(proto):
    assert set(proto.datasets) == set(TABLE_S5)
    assert proto.task == "ovss" and proto.id == "phreg" and proto.default_for_task


@pytest.mark.parametrize("dataset", list(TABLE_S5))
def test_matches_table_s5(proto, dataset):
    s = proto.settings(dataset)
    resize, crop, stride = TABLE_S5[dataset]
    assert (s["resize"], s["crop"], s["stride"]) == (resize, crop, stride)
    assert s["mode"] == "slide"
    assert s["logit_scale"] == 40
    if dataset in WITH_BACKGROUND:
        assert s["prob_thd"] == 0.1
    else:
        assert s["prob_thd"] == 0
    assert not s["pamr"] and s["area_thd"] is None  # no post-processing
    assert s["name_set"] == "sclip" and s["templates"] == "openai_imagenet_80"


def test_settings_are_copies(proto):
    s = proto.settings("voc21")
    s["crop"] = 1
    assert proto.settings("voc21")["crop"] == 336
