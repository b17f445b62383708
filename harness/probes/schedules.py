"""Learning-rate and momentum schedules with mmcv 1.x semantics (the runner DVT's configs ran under).

All functions take the 0-based iteration index ``it`` (mmcv ``runner.iter`` in ``before_train_iter``)
and return the value for that iteration, so a resumed run recomputes exactly the same value.

* poly: lr = (base - min_lr)·(1 - it/max)^power + min_lr (mmcv ``PolyLrUpdaterHook``);
* cosine: lr = target + ½(base - target)(1 + cos(π·it/max)), target = base·min_lr_ratio
  (mmcv ``CosineAnnealingLrUpdaterHook``);
* linear warm-up for it < warmup_iters: lr·(1 - k), k = (1 - it/warmup_iters)(1 - warmup_ratio)
  (mmcv ``LrUpdaterHook.get_warmup_lr``), applied on top of the regular value;
* one-cycle momentum (beta1 of AdamW): cosine from 0.95 to 0.85 until 30% of the run, then back to 0.95
  (mmcv ``OneCycleMomentumUpdaterHook`` defaults; DVT NYU config ``momentum_config=dict(policy="OneCycle")``).
  The depth protocols state the three numbers (``onecycle_momentum``); the constants below are the defaults
  for a caller that gives none (the linear-seg protocols use ``momentum: none``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

from ..errors import ConfigError

#: mmcv OneCycleMomentumUpdaterHook defaults (open-mmlab/mmcv @ 0665222 mmcv/runner/hooks/momentum_updater.py:
#: base_momentum=0.85, max_momentum=0.95, pct_start=0.3), what DVT's ``momentum_config=dict(policy="OneCycle")`` gets
ONECYCLE_BASE_MOMENTUM = 0.85
ONECYCLE_MAX_MOMENTUM = 0.95
ONECYCLE_PCT_START = 0.3


def annealing_cos(start: float, end: float, factor: float) -> float:
    """mmcv ``annealing_cos``: cosine from ``start`` (factor 0) to ``end`` (factor 1)."""
    return end + 0.5 * (start - end) * (math.cos(math.pi * factor) + 1)


def poly_lr(base: float, it: int, max_iters: int, power: float = 1.0, min_lr: float = 0.0) -> float:
    return (base - min_lr) * (1 - it / max_iters) ** power + min_lr


def cosine_lr(base: float, it: int, max_iters: int, min_lr_ratio: float = 0.0) -> float:
    return annealing_cos(base, base * min_lr_ratio, it / max_iters)


def warmup_factor(it: int, warmup_iters: int, warmup_ratio: float) -> float:
    """Multiplier of mmcv's linear warm-up (1 after the warm-up)."""
    if warmup_iters <= 0 or it >= warmup_iters:
        return 1.0
    k = (1 - it / warmup_iters) * (1 - warmup_ratio)
    return 1 - k


def onecycle_beta1(it: int, max_iters: int, base_momentum: float = ONECYCLE_BASE_MOMENTUM,
                   max_momentum: float = ONECYCLE_MAX_MOMENTUM, pct_start: float = ONECYCLE_PCT_START) -> float:
    """beta1 of mmcv's OneCycleMomentumUpdaterHook (two phases, cosine, no warm-up): ``max_momentum`` down to
    ``base_momentum`` until ``pct_start`` of the run, then back up."""
    end1 = float(pct_start * max_iters) - 1
    end2 = float(max_iters - 1)
    if it <= end1:
        return annealing_cos(max_momentum, base_momentum, it / end1 if end1 > 0 else 1.0)
    span = end2 - end1
    return annealing_cos(base_momentum, max_momentum, (it - end1) / span if span > 0 else 1.0)


class Schedule:
    """A protocol's ``schedule`` entry turned into ``lr(base, it)`` and ``beta1(it)``.

    Keys: ``policy`` (poly | cosine), ``power``, ``min_lr``, ``min_lr_ratio``, ``warmup_iters``,
    ``warmup_ratio``, ``momentum`` (none | onecycle). ``onecycle``: the protocol's ``onecycle_momentum``
    entry (``base_momentum``, ``max_momentum``, ``pct_start``), or None for mmcv's defaults.
    """

    POLICIES = ("poly", "cosine")
    ONECYCLE_KEYS = ("base_momentum", "max_momentum", "pct_start")

    def __init__(self, cfg: Dict[str, Any], max_iters: int, onecycle: Optional[Dict[str, float]] = None) -> None:
        self.cfg = dict(cfg)
        self.max_iters = int(max_iters)
        self.policy = str(cfg.get("policy", "poly"))
        if self.policy not in self.POLICIES:
            raise ConfigError(f"schedule.policy {self.policy!r} is not one of {', '.join(self.POLICIES)} "
                              f"(fix the protocol file)")
        self.momentum = str(cfg.get("momentum", "none"))
        if self.momentum not in ("none", "onecycle"):
            raise ConfigError(f"schedule.momentum {self.momentum!r} must be 'none' or 'onecycle'")
        if onecycle is not None and set(onecycle) != set(self.ONECYCLE_KEYS):
            raise ConfigError(f"onecycle_momentum needs exactly the keys {', '.join(self.ONECYCLE_KEYS)}; got "
                              f"{', '.join(sorted(onecycle))} (fix the protocol file)")
        self.onecycle = {k: float(v) for k, v in onecycle.items()} if onecycle is not None else {
            "base_momentum": ONECYCLE_BASE_MOMENTUM, "max_momentum": ONECYCLE_MAX_MOMENTUM,
            "pct_start": ONECYCLE_PCT_START}
        self.warmup_iters = int(cfg.get("warmup_iters", 0))
        self.warmup_ratio = float(cfg.get("warmup_ratio", 1.0))

    def lr(self, base: float, it: int) -> float:
        if self.policy == "poly":
            regular = poly_lr(base, it, self.max_iters, float(self.cfg.get("power", 1.0)),
                              float(self.cfg.get("min_lr", 0.0)))
        else:
            regular = cosine_lr(base, it, self.max_iters, float(self.cfg.get("min_lr_ratio", 0.0)))
        return regular * warmup_factor(it, self.warmup_iters, self.warmup_ratio)

    def beta1(self, it: int, default: float) -> float:
        return onecycle_beta1(it, self.max_iters, **self.onecycle) if self.momentum == "onecycle" else default
