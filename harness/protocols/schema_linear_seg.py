"""Schema of ``linear-seg`` protocols: the ``faithful`` DINOv2/DVT recipe and the cached ``fast`` probe."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Literal, Tuple, Union

from .probe_settings import AdamW, AdamWGrid, ProbeCommon, check_probe_settings
from .schema import Precision, TaskSchema, register_schema


@dataclass(frozen=True)
class SegHead:
    """BN + 1x1 conv head (DINOv2 BNHead): ``conv_init_std`` of the conv weights, bias 0."""

    conv_init_std: float


@dataclass(frozen=True)
class LinearSegFaithful(ProbeCommon):
    mode: Literal["faithful"]
    train_scale: Tuple[int, int]       # mmseg RandomResize scale
    ratio_range: Tuple[float, float]
    cat_max_ratio: float
    flip_prob: float
    photometric: bool                  # mmseg PhotoMetricDistortion with its defaults
    test_scale: Tuple[int, int]
    slide_crop: Tuple[int, int]
    slide_stride: Tuple[int, int]
    optimizer: AdamW
    head: SegHead
    precision: Precision = "fp32"


@dataclass(frozen=True)
class LinearSegFast(ProbeCommon):
    mode: Literal["fast"]
    test_scale: Tuple[int, int]
    slide_crop: Tuple[int, int]
    slide_stride: Tuple[int, int]
    optimizer: AdamWGrid
    holdout_fraction: float
    select_metric: Literal["mIoU", "mAcc", "aAcc"]
    head: SegHead
    precision: Precision = "fp32"
    #: version 2: cross-entropy on the token grid against per-token label histograms; ``pixel`` = version 1
    train_loss: Literal["pixel", "token"] = "pixel"


@register_schema("linear-seg")
class LinearSegSchema(TaskSchema):
    settings = Union[LinearSegFaithful, LinearSegFast]  # chosen by `mode`

    @classmethod
    def check_settings(cls, settings: Dict[str, Any], where: str) -> None:
        check_probe_settings(settings, where)
