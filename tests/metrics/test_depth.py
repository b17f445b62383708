"""Depth metrics against an independent numpy re-derivation (toolbox formulas, per-image then mean)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.metrics.depth import DEPTH_METRICS, DepthAccumulator, eigen_crop_mask, valid_depth_mask


def numpy_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Monocular-Depth-Estimation-Toolbox@d8aff50e ``depth/core/evaluation/metrics.py`` restated in numpy."""
    thresh = np.maximum(gt / pred, pred / gt)
    a1, a2, a3 = ((thresh < 1.25 ** i).mean() for i in (1, 2, 3))
    abs_rel = np.mean(np.abs(gt - pred) / gt)
    sq_rel = np.mean(((gt - pred) ** 2) / gt)
    rmse = np.sqrt(np.mean((gt - pred) ** 2))
    rmse_log = np.sqrt(np.mean((np.log(gt) - np.log(pred)) ** 2))
    err = np.log(pred) - np.log(gt)
    silog = np.sqrt(np.mean(err ** 2) - np.mean(err) ** 2) * 100
    log10 = np.mean(np.abs(np.log10(gt) - np.log10(pred)))
    return dict(delta1=a1, delta2=a2, delta3=a3, abs_rel=abs_rel, sq_rel=sq_rel, rmse=rmse, rmse_log=rmse_log,
                log10=log10, silog=silog)


def random_pair(rng: np.random.Generator, h: int = 480, w: int = 640):
    gt = rng.uniform(0.2, 9.5, size=(h, w))
    gt[rng.random((h, w)) < 0.2] = 0.0  # invalid (no return)
    gt[rng.random((h, w)) < 0.05] = 12.0  # beyond max_depth
    pred = np.clip(gt * rng.lognormal(0.0, 0.25, size=(h, w)), 0.01, 10.0)
    pred[gt == 0] = rng.uniform(0.01, 10.0, size=int((gt == 0).sum()))
    return pred, gt


def test_every_metric_matches_numpy_per_image_then_mean() -> None:
    rng = np.random.default_rng(0)
    acc = DepthAccumulator(min_depth=1e-3, max_depth=10.0, eigen_crop=True)
    refs = []
    for _ in range(3):
        pred, gt = random_pair(rng)
        acc.update(torch.from_numpy(pred).float(), torch.from_numpy(gt).float())
        mask = (gt > 1e-3) & (gt < 10.0)
        crop = np.zeros_like(mask)
        crop[45:471, 41:601] = True
        m = mask & crop
        p32, g32 = pred.astype(np.float32), gt.astype(np.float32)  # the accumulator sees float32 maps
        refs.append(numpy_metrics(p32[m].astype(np.float64), g32[m].astype(np.float64)))
    got = acc.compute()
    assert set(got) == set(DEPTH_METRICS)
    for k in DEPTH_METRICS:
        assert got[k] == pytest.approx(float(np.mean([r[k] for r in refs])), rel=1e-9, abs=1e-12), k


def test_rmse_is_a_mean_of_per_image_rmses_not_a_pooled_rmse() -> None:
    acc = DepthAccumulator(eigen_crop=False)
    gt = torch.full((4, 4), 2.0)
    acc.update(gt + 1.0, gt)  # rmse 1
    acc.update(gt + 3.0, gt)  # rmse 3
    assert acc.compute()["rmse"] == pytest.approx(2.0)  # pooled would be sqrt(5)


def test_eigen_crop_box_and_validity() -> None:
    m = eigen_crop_mask(480, 640)
    assert m.sum() == (471 - 45) * (601 - 41)
    assert m[45, 41] and m[470, 600] and not m[44, 41] and not m[45, 40] and not m[471, 41] and not m[45, 601]
    gt = torch.tensor([[0.0, 0.001, 0.5, 10.0, 11.0]])
    assert valid_depth_mask(gt, 1e-3, 10.0, eigen_crop=False).tolist() == [[False, False, True, False, False]]


def test_images_without_valid_pixels_are_skipped() -> None:
    acc = DepthAccumulator(eigen_crop=False)
    acc.update(torch.ones(3, 3), torch.zeros(3, 3))
    acc.update(torch.ones(3, 3), torch.full((3, 3), 2.0))
    out = acc.compute()
    assert out["abs_rel"] == pytest.approx(0.5) and len(acc) == 2
    assert all(math.isnan(v) for v in acc.per_image[0].values())
