"""SigLoss and the gradient loss on hand-made cases; the gradient loss is spatial, DINOv2's slicing is not."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.probes.losses import LOG_EPS, depth_loss, gradient_loss, sig_loss


def dinov2_gradient_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """DINOv2 ``GradientLoss.gradientloss`` as written: slices dims 0 and 1 of the (B, 1, H, W) tensors."""
    total = pred.new_zeros(())
    ins = [pred] + [pred[:: 2 * i, :: 2 * i] for i in range(1, 4)]
    tgs = [gt] + [gt[:: 2 * i, :: 2 * i] for i in range(1, 4)]
    for x, t in zip(ins, tgs):
        mask = (t > 0).to(x.dtype)
        n = mask.sum()
        d = (torch.log(x + LOG_EPS) - torch.log(t + LOG_EPS)) * mask
        v = (d[0:-2, :] - d[2:, :]).abs() * (mask[0:-2, :] * mask[2:, :])
        h = (d[:, 0:-2] - d[:, 2:]).abs() * (mask[:, 0:-2] * mask[:, 2:])
        total = total + (h.sum() + v.sum()) / n
    return total


def log_ramp(h: int, w: int, a: float, batch: int = 1):
    """gt and pred with log(pred + eps) - log(gt + eps) = a·x exactly (float64): a horizontal log-error ramp."""
    u = torch.linspace(0.0, 1.0, h * w, dtype=torch.float64).reshape(h, w)
    x = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    gt = torch.exp(u) - LOG_EPS
    pred = torch.exp(u + a * x) - LOG_EPS
    return pred[None, None].repeat(batch, 1, 1, 1), gt[None, None].repeat(batch, 1, 1, 1)


def test_sigloss_hand_computed() -> None:
    g = np.array([0.1, -0.2, 0.3, 0.0], dtype=np.float64)
    gt = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    pred = (gt + LOG_EPS) * torch.exp(torch.from_numpy(g)) - LOG_EPS
    expected = math.sqrt(g.var(ddof=1) + 0.15 * g.mean() ** 2)  # torch.var is unbiased, as in DINOv2
    assert sig_loss(pred, gt).item() == pytest.approx(expected, rel=1e-10)
    assert sig_loss(pred, gt, warm_up=True).item() == pytest.approx(math.sqrt(0.15) * abs(g.mean()), rel=1e-10)
    assert sig_loss(gt, gt).item() == 0.0


def test_sigloss_ignores_invalid_pixels_and_is_scale_aware() -> None:
    gt = torch.tensor([[2.0, 0.0, 4.0, 5.0]])
    pred = torch.tensor([[2.0, 7.0, 4.0, 5.0]])
    assert sig_loss(pred, gt).item() == pytest.approx(0.0, abs=1e-7)  # the gt = 0 pixel does not count
    # a pure scale error has zero variance: only the 0.15·mean² term remains (lambda = 0.85)
    g = math.log(2.0 * 3.0 + LOG_EPS) - math.log(3.0 + LOG_EPS)
    assert sig_loss(torch.full((5,), 6.0, dtype=torch.float64), torch.full((5,), 3.0, dtype=torch.float64)).item() \
        == pytest.approx(math.sqrt(0.15) * g, rel=1e-9)


def test_gradient_loss_is_spatial_hand_computed() -> None:
    h, w, a = 7, 9, 0.1
    pred, gt = log_ramp(h, w, a)
    expected = 0.0
    for s in (1, 2, 4, 6):
        hs, ws = math.ceil(h / s), math.ceil(w / s)
        # columns two apart (in the subsampled grid) differ by 2·a·s; rows do not differ; N = hs·ws valid pixels
        expected += 2 * a * s * hs * (ws - 2) / (hs * ws)
    assert gradient_loss(pred, gt).item() == pytest.approx(expected, rel=1e-9)


def test_dinov2_batch_channel_slicing_gives_a_different_answer() -> None:
    """The loss above would fail with DINOv2's slicing: 0 for 2 images, and it depends on the batch size."""
    pred2, gt2 = log_ramp(7, 9, 0.1, batch=2)
    ours = gradient_loss(pred2, gt2).item()
    assert ours > 0.1
    assert dinov2_gradient_loss(pred2, gt2).item() == 0.0  # DINOv2 gradientloss.py: identically 0 for B = 2
    pred3, gt3 = log_ramp(7, 9, 0.1, batch=3)
    single = gradient_loss(*log_ramp(7, 9, 0.1, batch=1)).item()
    # spatial: a batch of copies has the same per-pixel gradients, the sums and N scale together
    assert ours == pytest.approx(single, rel=1e-9)
    assert gradient_loss(pred3, gt3).item() == pytest.approx(single, rel=1e-9)
    assert dinov2_gradient_loss(pred3, gt3).item() != pytest.approx(single, rel=1e-3)


def test_gradient_loss_masks_invalid_pixels() -> None:
    pred, gt = log_ramp(6, 8, 0.2)
    gt_holes = gt.clone()
    gt_holes[..., :, 3] = 0.0  # a column without depth: pairs touching it do not count
    full = gradient_loss(pred, gt).item()
    holes = gradient_loss(pred, gt_holes).item()
    assert holes != pytest.approx(full) and math.isfinite(holes)
    assert gradient_loss(pred, torch.zeros_like(gt)).item() == 0.0  # no valid pixel: 0, not NaN


def test_depth_loss_combines_with_weights_and_warm_up() -> None:
    pred, gt = log_ramp(6, 8, 0.05)
    pred = pred * 1.3
    full = depth_loss(pred, gt, iteration=500)
    assert full.item() == pytest.approx(sig_loss(pred, gt).item() + 0.5 * gradient_loss(pred, gt).item(), rel=1e-9)
    warm = depth_loss(pred, gt, iteration=5)
    assert warm.item() == pytest.approx(sig_loss(pred, gt, warm_up=True).item() + 0.5 * gradient_loss(pred, gt).item(),
                                        rel=1e-9)
    assert depth_loss(pred, gt, iteration=5, warm_iters=0).item() == pytest.approx(full.item(), rel=1e-12)
