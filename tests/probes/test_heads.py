"""Probe heads: the BN + 1x1 conv segmentation head and the AdaBins-style bins depth head, by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.probes.heads import DepthBinsHead, HeadBank, LinearSegHead, depth_head_input


def test_seg_head_is_linear_after_batchnorm() -> None:
    torch.manual_seed(0)
    head = LinearSegHead(8, 5)
    assert head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.5)
    assert torch.count_nonzero(head.conv_seg.bias) == 0
    head.eval()
    head.bn.running_mean.uniform_(-1, 1)
    head.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 8, 3, 4)
    bn = (x - head.bn.running_mean[None, :, None, None]) / torch.sqrt(head.bn.running_var[None, :, None, None] + 1e-5)
    weight, bias = head.conv_seg.weight[:, :, 0, 0], head.conv_seg.bias[None, :, None, None]
    expected = torch.einsum("kc,bchw->bkhw", weight, bn) + bias
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-6)


def test_depth_head_input_appends_the_broadcast_cls() -> None:
    patch, cls = torch.randn(2, 3, 4, 5), torch.randn(2, 3)
    x = depth_head_input(patch, cls)
    assert x.shape == (2, 6, 4, 5)
    torch.testing.assert_close(x[:, :3], patch)
    torch.testing.assert_close(x[:, 3:, 2, 1], cls)


@pytest.mark.parametrize("in_channels", [16, 600])  # fewer and more channels than bins: both conv orders
def test_depth_bins_head_by_hand(in_channels: int) -> None:
    torch.manual_seed(0)
    head = DepthBinsHead(in_channels)
    assert head.bins.shape == (256,) and head.bins[0].item() == pytest.approx(0.001)
    assert head.bins[-1].item() == pytest.approx(10.0)
    x = torch.randn(2, in_channels, 3, 5)
    up = F.interpolate(x, size=(12, 20), mode="bilinear", align_corners=False)
    z = torch.relu(head.conv_depth(up)) + 0.1
    p = z / z.sum(1, keepdim=True)
    expected = (p * torch.linspace(0.001, 10.0, 256)[None, :, None, None]).sum(1, keepdim=True)
    out = head(x)
    assert out.shape == (2, 1, 12, 20)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert out.min() >= 0.001 and out.max() <= 10.0


def test_head_bank_runs_independent_heads() -> None:
    bank = HeadBank([LinearSegHead(4, 3), LinearSegHead(4, 3)])
    outs = bank(torch.randn(2, 4, 2, 2))
    assert len(bank) == 2 and len(outs) == 2 and not torch.equal(outs[0], outs[1])
