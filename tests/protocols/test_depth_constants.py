"""Issue 10: the NYU training crop, the Eigen test crop and the one-cycle momentum are depth protocol keys.

Each key is read where it acts (the metric mask, the training transform and the fixed-view cache, AdamW's
beta1), checked here against values worked out by hand from the public sources (the depth toolbox's
``NYUCrop`` and Eigen crop, mmcv's ``OneCycleMomentumUpdaterHook`` formula); the shipped files hold the
toolbox's / mmcv's numbers, which the code keeps only as the defaults of its functions.
"""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from harness.errors import ConfigError
from harness.evaluators.depth import DepthEvaluator
from harness.metrics.depth import EIGEN_CROP, eigen_crop_mask
from harness.probes.data import NYU_TRAIN_CROP, depth_fixed_view_pipeline, register_transforms
from harness.probes.schedules import ONECYCLE_BASE_MOMENTUM, ONECYCLE_MAX_MOMENTUM, ONECYCLE_PCT_START, Schedule
from harness.protocols import HERE, get_protocol, load_protocol_file


def _variant(tmp_path, pid: str, **overrides) -> str:
    """The shipped depth protocol ``pid`` with a new id and some defaults replaced."""
    with open(os.path.join(HERE, "depth", f"{pid}.yaml")) as f:
        data = yaml.safe_load(f)
    data["id"] = f"{pid}-variant"
    data.pop("default", None)
    data["defaults"].update(overrides)
    path = tmp_path / f"{pid}-variant.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("pid,version", [("faithful", 2), ("fast", 4)])
def test_shipped_depth_protocols_state_the_toolbox_and_mmcv_constants(pid, version) -> None:
    p = get_protocol("depth", pid)
    s = p.settings("nyu")
    assert p.version == version
    # toolbox NYUCrop [45:472, 43:608] and Eigen crop [45:471, 41:601]; mmcv OneCycle 0.85 / 0.95 / 0.3
    assert s["nyu_crop_box"] == [45, 472, 43, 608] and s["eigen_crop_box"] == [45, 471, 41, 601]
    assert s["onecycle_momentum"] == {"base_momentum": 0.85, "max_momentum": 0.95, "pct_start": 0.3}
    # the code's documented defaults are the same numbers (a protocol without a value never differs from them)
    assert tuple(s["nyu_crop_box"]) == NYU_TRAIN_CROP and tuple(s["eigen_crop_box"]) == EIGEN_CROP
    assert (ONECYCLE_BASE_MOMENTUM, ONECYCLE_MAX_MOMENTUM, ONECYCLE_PCT_START) == (0.85, 0.95, 0.3)


def _mask_metrics(settings: dict) -> dict:
    """abs_rel of a prediction that is exact on the left half of a 480x640 frame and 2x too deep on the right."""
    acc = DepthEvaluator()._accumulator(SimpleNamespace(settings=settings), True)
    gt = torch.full((480, 640), 2.0)
    pred = gt.clone()
    pred[:, 320:] = 4.0
    return acc.update(pred, gt)


def test_changing_eigen_crop_box_in_a_protocol_changes_the_metric_mask(tmp_path) -> None:
    shipped = get_protocol("depth", "fast").settings("nyu")
    left = load_protocol_file(_variant(tmp_path, "fast", eigen_crop_box=[0, 480, 0, 320])).settings("nyu")
    # shipped box: rows 45:471, cols 41:601 -> 281 of its 560 columns lie right of 320, each off by |2 - 4| / 2
    assert _mask_metrics(shipped)["abs_rel"] == pytest.approx((601 - 320) / (601 - 41) * 1.0)
    assert _mask_metrics(left)["abs_rel"] == 0.0  # the left half only: exact
    # the mask itself, by hand
    assert eigen_crop_mask(480, 640, box=(0, 480, 0, 320)).sum() == 480 * 320
    m = eigen_crop_mask(480, 640, box=(10, 20, 30, 45))
    assert m.sum() == 10 * 15 and m[10, 30] and m[19, 44] and not m[20, 44] and not m[19, 45]
    assert torch.equal(eigen_crop_mask(480, 640), eigen_crop_mask(480, 640, box=EIGEN_CROP))


def test_nyu_crop_box_reaches_the_training_transform_and_the_cache_key(tmp_path) -> None:
    register_transforms()
    from mmseg.registry import TRANSFORMS

    pipe = depth_fixed_view_pipeline(1e-3, (416, 544), (0, 400, 10, 600))
    crop = TRANSFORMS.build(pipe[2])
    img = np.arange(480 * 640 * 3, dtype=np.int64).reshape(480, 640, 3)
    depth = np.arange(480 * 640, dtype=np.float32).reshape(480, 640)
    out = crop.transform({"img": img.copy(), "gt_depth_map": depth.copy(), "seg_fields": ["gt_depth_map"]})
    np.testing.assert_array_equal(out["gt_depth_map"], depth[0:400, 10:600])
    np.testing.assert_array_equal(out["img"], img[0:400, 10:600])
    # the default pipeline keeps the toolbox box, so existing fast caches keep their names
    assert depth_fixed_view_pipeline(1e-3, (416, 544))[2]["box"] == NYU_TRAIN_CROP
    with pytest.raises(ValueError, match="row0 < row1"):
        TRANSFORMS.build(dict(type="HarnessNYUCrop", box=(50, 40, 0, 10)))


def test_onecycle_momentum_from_the_protocol_drives_beta1() -> None:
    sched = {"policy": "cosine", "min_lr_ratio": 0.0, "warmup_iters": 0, "warmup_ratio": 1.0, "momentum": "onecycle"}
    s = Schedule(sched, 100, {"base_momentum": 0.5, "max_momentum": 0.9, "pct_start": 0.5})
    # mmcv two-phase cosine: 0.9 at it 0, 0.5 at it = 0.5 * 100 - 1 = 49, back to 0.9 at it 99
    assert s.beta1(0, 0.1) == pytest.approx(0.9)
    assert s.beta1(49, 0.1) == pytest.approx(0.5)
    mid = 0.5 + 0.5 * (0.9 - 0.5) * (1 + math.cos(math.pi * 24 / 49))  # annealing_cos(0.9, 0.5, 24 / 49)
    assert s.beta1(24, 0.1) == pytest.approx(mid)
    assert s.beta1(99, 0.1) == pytest.approx(0.9)
    # without the entry: mmcv's defaults (0.95 -> 0.85 at 30 %), what the linear-seg protocols would get
    d = Schedule(sched, 100)
    assert d.beta1(0, 0.1) == pytest.approx(0.95) and d.beta1(29, 0.1) == pytest.approx(0.85)
    with pytest.raises(ConfigError, match="onecycle_momentum needs exactly"):
        Schedule(sched, 100, {"base_momentum": 0.5})


@pytest.mark.parametrize("key,value,message", [
    ("eigen_crop_box", [45, 500, 41, 601], "eigen_crop_box must be"),
    ("nyu_crop_box", [45, 472, 608, 43], "nyu_crop_box must be"),
    ("onecycle_momentum", {"base_momentum": 0.95, "max_momentum": 0.85, "pct_start": 0.3}, "base_momentum <="),
    ("eigen_crop_box", [45, 471, 41], "expected a list of 4 values"),
])
def test_bad_depth_constants_name_the_file_and_key(tmp_path, key, value, message) -> None:
    path = _variant(tmp_path, "faithful", **{key: value})
    with pytest.raises(ConfigError, match=message) as e:
        load_protocol_file(path)
    assert "faithful-variant.yaml" in str(e.value) and key in str(e.value)
