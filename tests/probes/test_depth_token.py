"""The ``fast`` v3 depth step (loss at the token grid) against plain autograd and hand-computed targets.

References: the heads' own module forward (``DepthBinsHead`` with ``upsample=1`` on ``depth_head_input``)
followed by :func:`depth_loss`, differentiated by autograd head by head; the bins expectation written out
with ReLU, normalisation and sum, and ``torch.autograd.gradcheck`` (finite differences) for the hand-written
backward of the fused product + expectation; a depth map whose per-token valid means are worked out by hand.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness.evaluators.depth import DepthEvaluator
from harness.probes.cache import FeatureCache
from harness.probes.heads import DepthBinsHead, _TokenGridDepth, depth_head_input, depth_token_grid_train
from harness.probes.losses import depth_loss, depth_losses
from harness.protocols import get_protocol

LOSS = get_protocol("depth", "fast").settings("nyu")["loss"]


def _heads(c: int, n: int, dtype: torch.dtype) -> list:
    torch.manual_seed(7)
    heads = [DepthBinsHead(2 * c, n_bins=32, upsample=4).to(dtype) for _ in range(n)]
    for h in heads:  # logits of both signs, so the ReLU mask matters in the backward
        with torch.no_grad():
            h.conv_depth.weight.normal_(0, 0.3)
            h.conv_depth.bias.uniform_(-0.2, 0.2)
    return heads


def _batch(b: int, c: int, hw, dtype: torch.dtype):
    g = torch.Generator().manual_seed(8)
    patch = torch.randn(b, c, *hw, generator=g, dtype=dtype) * 2 + 0.5  # (B, C, h, w), like cached features
    cls = torch.randn(b, c, generator=g, dtype=dtype)
    gt = torch.rand(b, 1, *hw, generator=g, dtype=dtype) * 6 + 0.5
    gt[:, :, 0, :3] = 0  # tokens without a valid pixel (target 0 = invalid)
    gt[1, :, 2:, 1:] = 0
    return patch, cls, gt


def _reference(heads: list, patch, cls, gt, it: int):
    """Plain autograd: each head as a module with upsample=1, its own loss, its own backward."""
    losses = []
    for h in heads:
        ref = copy.deepcopy(h)
        ref.upsample = 1
        loss = depth_loss(ref(depth_head_input(patch, cls)), gt, it, warm_iters=100, **LOSS)
        loss.backward()
        losses.append((loss.detach(), ref.conv_depth.weight.grad, ref.conv_depth.bias.grad))
    return losses


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("it", [5, 500])  # SigLoss warm-up and the full loss
def test_token_step_loss_and_gradients_equal_autograd_of_the_module(dtype, tol, it) -> None:
    b, c, hw = 3, 20, (5, 7)  # 2C = 40 input channels, 32 bins
    heads = _heads(c, 3, dtype)
    patch, cls, gt = _batch(b, c, hw, dtype)
    ref = _reference(heads, patch, cls, gt, it)
    preds = depth_token_grid_train(heads, patch.permute(1, 0, 2, 3).contiguous(), cls)
    assert preds.shape == (3, b, 1, *hw)
    losses = depth_losses(preds, gt, it, warm_iters=100, **LOSS)  # all heads at once, as the v3 step does
    assert losses.shape == (3,)
    losses.sum().backward()  # one backward for the grid, as the trainer's losses_fn does
    for h, loss, (ref_loss, ref_w, ref_b) in zip(heads, losses, ref):
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=tol, atol=tol)
        torch.testing.assert_close(h.conv_depth.weight.grad, ref_w, rtol=tol, atol=tol)
        torch.testing.assert_close(h.conv_depth.bias.grad, ref_b, rtol=tol, atol=tol)
        assert h.conv_depth.weight.grad.abs().max() > 1e-4  # a real gradient, not an all-zero match
    # the depth itself, against the module at upsample=1 (it stays x4 in the heads: held-out and test use it)
    for h, p in zip(heads, preds):
        ref_h = copy.deepcopy(h)
        ref_h.upsample = 1
        torch.testing.assert_close(p.detach(), ref_h(depth_head_input(patch, cls)).detach(), rtol=tol, atol=tol)
        assert h.upsample == 4


@pytest.mark.parametrize("images", [2, 3, 4])  # chunks of two images, and of one where they do not pair up
def test_fused_product_and_expectation_value_and_gradcheck(images) -> None:
    torch.manual_seed(9)
    tokens, c, heads, k = 3, 4, 2, 5
    bins = torch.linspace(0.5, 4.0, k, dtype=torch.float64)
    x = torch.randn(images * tokens, c, dtype=torch.float64, requires_grad=True)
    w = torch.randn(heads * k, c, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(images, heads * k, dtype=torch.float64, requires_grad=True)
    out = _TokenGridDepth.apply(x, w, bias, bins, 0.1, heads)
    z = (x.detach() @ w.detach().t()).view(images, tokens, -1) + bias.detach()[:, None, :]
    p = torch.relu(z.view(images * tokens, heads, k)) + 0.1
    expected = (p / p.sum(-1, keepdim=True) * bins).sum(-1)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-12, atol=0)
    assert out.shape == (images * tokens, heads)
    # finite differences (the ReLU kinks have measure zero for random inputs); x's gradient too, though unused
    assert torch.autograd.gradcheck(lambda *t: _TokenGridDepth.apply(*t, bins, 0.1, heads), (x, w, bias))
    # the backward leaves the saved logits alone: a kept graph differentiates twice to the same gradient
    out = _TokenGridDepth.apply(x, w, bias, bins, 0.1, heads)
    first = torch.autograd.grad(out.sum(), w, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(out.sum(), w)[0], first, rtol=0, atol=0)


@pytest.mark.parametrize("it,max_depth", [(5, None), (500, None), (500, 3.0)])
def test_all_heads_loss_equals_the_per_head_loss(it, max_depth) -> None:
    g = torch.Generator().manual_seed(10)
    preds = torch.rand(4, 2, 1, 9, 13, generator=g, dtype=torch.float64) * 5 + 0.1
    gt = torch.rand(2, 1, 9, 13, generator=g, dtype=torch.float64) * 5
    gt[gt < 1.0] = 0  # invalid pixels
    preds.requires_grad_(True)
    ours = depth_losses(preds, gt, it, max_depth=max_depth, warm_iters=100, **LOSS)
    ours.sum().backward()
    ref_grad = torch.zeros_like(preds)
    for j in range(4):
        p = preds.detach()[j].clone().requires_grad_(True)
        ref = depth_loss(p, gt, it, max_depth=max_depth, warm_iters=100, **LOSS)
        ref.backward()
        ref_grad[j] = p.grad
        torch.testing.assert_close(ours[j].detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(preds.grad, ref_grad, rtol=1e-10, atol=1e-12)
    # no valid pixel: zero loss, connected to the graph (as depth_loss)
    empty = depth_losses(preds, torch.zeros_like(gt), it, warm_iters=100, **LOSS)
    assert empty.tolist() == [0.0] * 4 and empty.requires_grad
    with pytest.raises(ValueError, match="do not match"):
        depth_losses(preds, gt[:1], it, **LOSS)


def test_token_step_refuses_mismatched_shapes_and_heads() -> None:
    heads = _heads(4, 2, torch.float32)
    with pytest.raises(ValueError, match="input channels"):
        depth_token_grid_train(heads, torch.randn(5, 2, 3, 3), torch.randn(2, 5))
    other = DepthBinsHead(8, n_bins=32, max_depth=5.0)
    with pytest.raises(ValueError, match="share their bins"):
        depth_token_grid_train([heads[0], other], torch.randn(4, 2, 3, 3), torch.randn(2, 4))


def _fake_run(tmp_path, scale: float = 0.001):
    """What ``_output_targets`` reads of a probe run: settings, dataset, progress flag and its derived caches."""
    def derived_cache(src, what, params, arrays):
        return FeatureCache(str(tmp_path / f"derived-{what}-{params['grid'][0]}x{params['grid'][1]}"),
                            {**src.key_fields, "derived": {"what": what, **params}}, arrays)

    return SimpleNamespace(settings={"depth_rescale_factor": scale, "train_split": "train", "upsample": 4},
                           dataset="nyu", cfg=SimpleNamespace(progress=False), derived_cache=derived_cache)


def test_token_targets_are_the_valid_mean_of_each_tokens_pixels_by_hand(tmp_path) -> None:
    """A 28x28 view (millimetre PNG values) on a 2x2 token grid: each token owns one 14x14 quadrant."""
    d = np.zeros((28, 28), dtype=np.uint16)
    d[:14, :14] = 1000                    # top-left: 1.0 m everywhere ...
    d[:14:2, :14] = 0                     # ... with every other row invalid: still 1.0
    d[:7, 14:] = 2000                     # top-right: half at 2.0 m, half at 4.0 m -> 3.0
    d[7:14, 14:] = 4000
    d[20, 3] = 0                          # bottom-left: nothing valid -> 0 (invalid target)
    d[27, 27] = 5000                      # bottom-right: a single valid pixel at 5.0 m -> 5.0
    src = FeatureCache(str(tmp_path / "src"), {"k": 1}, {"patch": "float16", "cls": "float16", "depth": "uint16"})
    src.open_for_write()
    src.append({"patch": np.zeros((3, 2, 2), np.float16), "cls": np.zeros(3, np.float16), "depth": d})
    src.finish()
    run = _fake_run(tmp_path)
    tokens = DepthEvaluator()._output_targets(run, src, 1)
    np.testing.assert_allclose(tokens.get(0, "depth"), [[1.0, 3.0], [0.0, 5.0]], rtol=1e-6)
    # independent numpy re-computation: per quadrant, the mean of its non-zero pixels in metres
    ref = np.zeros((2, 2))
    for i in range(2):
        for j in range(2):
            q = d[14 * i:14 * (i + 1), 14 * j:14 * (j + 1)].astype(np.float64) / 1000
            ref[i, j] = q[q > 0].mean() if (q > 0).any() else 0.0
    np.testing.assert_allclose(tokens.get(0, "depth"), ref, rtol=1e-6)
    # v2's targets of the same view live on the head's output grid (x4), in a cache of their own
    out = DepthEvaluator()._output_targets(run, src, 4)
    assert out.shape(0, "depth") == (8, 8) and out.path != tokens.path
    assert out.get(0, "depth")[0, 0] == pytest.approx(1.0) and out.get(0, "depth")[0, 4] == pytest.approx(2.0)
