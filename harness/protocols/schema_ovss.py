"""Schema of ``ovss`` protocols: zero-shot segmentation settings (resize, windows, text, post-processing)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional

from ..errors import ConfigError
from .schema import Precision, TaskSchema, register_schema


@dataclass(frozen=True)
class Pamr:
    """PAMR post-processing (NACLIP naclip.py: pamr_steps, pamr_stride)."""

    steps: int
    dilations: List[int]


@dataclass(frozen=True)
class OVSSSettings:
    """Resolved settings of one dataset under an ``ovss`` protocol."""

    mode: Literal["slide", "whole"]  # mmseg slide_inference, or the resized image encoded once
    crop: int                        # sliding-window size (pixels)
    stride: int                      # sliding-window stride (pixels)
    max_long_side: int               # mmcv imrescale scale=(max_long_side, resize)
    resize: int                      # short side after the keep-ratio resize
    logit_scale: float               # softmax temperature on cosine logits
    prob_thd: float                  # max probability below it -> class 0
    area_thd: Optional[float]        # SCLIP area threshold, or null
    pamr: Optional[Pamr]             # PAMR post-processing, or null
    name_set: str                    # harness/text/names/<name_set>/
    templates: str                   # harness/text/templates.py TEMPLATE_SETS key
    precision: Precision = "fp32"    # absent = the fp32 reference


@register_schema("ovss")
class OVSSSchema(TaskSchema):
    settings = OVSSSettings

    @classmethod
    def check_settings(cls, settings: Dict[str, Any], where: str) -> None:
        if min(settings["crop"], settings["stride"], settings["resize"], settings["max_long_side"]) <= 0:
            raise ConfigError(f"{where}: crop, stride, resize and max_long_side must be positive")
        if settings["stride"] > settings["crop"]:
            raise ConfigError(f"{where}: stride {settings['stride']} exceeds crop {settings['crop']}: windows "
                              f"would leave gaps")
        if not 0.0 <= settings["prob_thd"] < 1.0:
            raise ConfigError(f"{where}: prob_thd must be in [0, 1), got {settings['prob_thd']}")
