"""Learning-rate / momentum schedules against mmcv 1.x formulas at hand-picked iterations."""
from __future__ import annotations

import math

import pytest

from harness.errors import ConfigError
from harness.probes.schedules import Schedule, onecycle_beta1

SEG = {"policy": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 1500, "warmup_ratio": 1e-6}
DEPTH = {"policy": "cosine", "min_lr_ratio": 1e-8, "warmup_iters": 12800, "warmup_ratio": 1e-3, "momentum": "onecycle"}


def test_poly_with_linear_warmup() -> None:
    s = Schedule(SEG, 40000)
    assert s.lr(1e-3, 0) == pytest.approx(1e-3 * 1e-6)  # k = 1 - 1e-6 at it 0
    mid = 750
    k = (1 - mid / 1500) * (1 - 1e-6)
    assert s.lr(1e-3, mid) == pytest.approx(1e-3 * (1 - mid / 40000) * (1 - k))
    assert s.lr(1e-3, 1500) == pytest.approx(1e-3 * (1 - 1500 / 40000))
    assert s.lr(1e-3, 39999) == pytest.approx(1e-3 / 40000)
    assert s.beta1(100, 0.9) == 0.9


def test_cosine_with_warmup_and_onecycle_momentum() -> None:
    s = Schedule(DEPTH, 38400)
    target = 5e-3 * 1e-8
    cos = target + 0.5 * (5e-3 - target) * (1 + math.cos(math.pi * 12800 / 38400))
    assert s.lr(5e-3, 12800) == pytest.approx(cos)
    assert s.lr(5e-3, 0) == pytest.approx(5e-3 * 1e-3)
    assert s.beta1(0, 0.9) == pytest.approx(0.95)
    end1 = 0.3 * 38400 - 1
    expected = 0.85 + 0.5 * 0.1 * (1 + math.cos(math.pi * int(end1) / end1))
    assert onecycle_beta1(int(end1), 38400) == pytest.approx(expected)
    assert s.beta1(38399, 0.9) == pytest.approx(0.95)
    assert min(s.beta1(i, 0.9) for i in range(0, 38400, 97)) == pytest.approx(0.85, abs=1e-4)


def test_bad_schedule_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="protocol file"):
        Schedule({"policy": "step"}, 10)
    with pytest.raises(ConfigError, match="momentum"):
        Schedule({"policy": "poly", "momentum": "cyclic"}, 10)
