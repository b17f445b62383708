"""Settings shared by the probe tasks' schemas (``linear-seg``, ``depth``): optimiser and schedule.

Sources of the values are in each protocol file; here only their types. ``momentum: none`` is an mmcv
config without ``momentum_config`` (AdamW's beta1 stays at ``betas[0]``); a schedule may leave it out (the
shipped files state it), as ``precision`` may be left out for ``fp32``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from ..errors import ConfigError


@dataclass(frozen=True)
class AdamW:
    """One head, one learning rate (the ``faithful`` recipes)."""

    type: Literal["AdamW"]
    lr: float
    weight_decay: float
    betas: Tuple[float, float]
    grad_clip: Optional[float]  # max L2 norm per head, or null


@dataclass(frozen=True)
class AdamWGrid:
    """A learning-rate grid of heads trained together (the ``fast`` protocols)."""

    type: Literal["AdamW"]
    lrs: List[float]
    weight_decay: float
    betas: Tuple[float, float]
    grad_clip: Optional[float]


@dataclass(frozen=True)
class PolySchedule:
    """mmcv PolyLrUpdaterHook with linear warm-up."""

    policy: Literal["poly"]
    power: float
    min_lr: float
    warmup_iters: int
    warmup_ratio: float
    momentum: Literal["none", "onecycle"] = "none"


@dataclass(frozen=True)
class CosineSchedule:
    """mmcv CosineAnnealingLrUpdaterHook with linear warm-up."""

    policy: Literal["cosine"]
    min_lr_ratio: float
    warmup_iters: int
    warmup_ratio: float
    momentum: Literal["none", "onecycle"] = "none"


Schedule = Union[PolySchedule, CosineSchedule]


@dataclass(frozen=True)
class ProbeCommon:
    """Keys every probe protocol has, whatever its task and mode."""

    train_split: str
    crop_size: Tuple[int, int]
    max_iters: int
    batch_size: int
    schedule: Schedule
    eval_interval: int
    checkpoint_interval: int
    log_interval: int


def check_probe_settings(settings: Dict[str, Any], where: str) -> None:
    """Positive sizes and counts, a grid with at least one learning rate, a held-out fraction in (0, 1)."""
    for key in ("max_iters", "batch_size", "eval_interval", "checkpoint_interval", "log_interval"):
        if settings[key] <= 0:
            raise ConfigError(f"{where}: {key} must be positive, got {settings[key]}")
    if min(settings["crop_size"]) <= 0:
        raise ConfigError(f"{where}: crop_size must be positive, got {settings['crop_size']}")
    if "lrs" in settings["optimizer"] and not settings["optimizer"]["lrs"]:
        raise ConfigError(f"{where}: optimizer.lrs must list at least one learning rate")
    if "holdout_fraction" in settings and not 0.0 < settings["holdout_fraction"] < 1.0:
        raise ConfigError(f"{where}: holdout_fraction must be in (0, 1), got {settings['holdout_fraction']}")
