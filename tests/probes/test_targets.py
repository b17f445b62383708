"""Token-grid targets and the fast v2 training steps, against independent re-computations.

References: a per-token numpy histogram written out with explicit pixel-centre arithmetic, hand-counted
cells, PyTorch's ``nearest-exact`` interpolation, the full-resolution cross-entropy of nearest-upsampled
logits, and the heads' own module forward (for the folded BatchNorm and the split CLS conv).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.probes.cache import FeatureCache
from harness.probes.heads import (
    DepthBinsHead,
    LinearSegHead,
    centre_batch,
    depth_head_input,
    depth_head_split_forward,
    seg_grid_train_logits,
)
from harness.probes.losses import depth_loss
from harness.probes.targets import (
    cell_index,
    derive_cache,
    label_counts,
    masked_mean_pool,
    token_seg_loss,
    token_seg_losses,
)

IGNORE = 255


def owner(y: int, size: int, cells: int) -> int:
    """Cell of pixel ``y``: its centre y + 0.5 scaled onto the cell grid (align_corners=False), floored."""
    return int(math.floor((y + 0.5) * cells / size))


def reference_counts(label: np.ndarray, grid, num_classes: int) -> np.ndarray:
    """Per token: np.histogram of the non-ignored labels of the pixels it owns."""
    h, w = grid
    out = np.zeros((num_classes, h, w), dtype=np.float64)
    rows = np.array([owner(y, label.shape[0], h) for y in range(label.shape[0])])
    cols = np.array([owner(x, label.shape[1], w) for x in range(label.shape[1])])
    for i in range(h):
        for j in range(w):
            pix = label[np.ix_(rows == i, cols == j)].ravel()
            pix = pix[pix != IGNORE]
            out[:, i, j] = np.histogram(pix, bins=np.arange(num_classes + 1))[0]
    return out


def test_cell_index_is_torch_nearest_exact() -> None:
    for size, cells in [(512, 37), (512, 32), (7, 3), (416, 120), (544, 156), (5, 5), (3, 8)]:
        idx = torch.arange(cells, dtype=torch.float64)[None, None, :, None]
        up = F.interpolate(idx, size=(size, 1), mode="nearest-exact")[0, 0, :, 0].long().numpy()
        np.testing.assert_array_equal(cell_index(size, cells), up)
    # 512 label pixels over 37 tokens: 13 or 14 pixels each, all 512 assigned
    per_token = np.bincount(cell_index(512, 37))
    assert len(per_token) == 37 and set(per_token) == {13, 14} and per_token.sum() == 512


def test_label_counts_hand_made_map_with_ignore_pixels() -> None:
    # 7 x 5 labels onto a 3 x 2 grid: rows 0-1 -> 0, 2-4 -> 1, 5-6 -> 2; cols 0-1 -> 0, 2-4 -> 1
    label = np.array([[0, 0, 1, 1, 2],
                      [0, 255, 1, 2, 2],
                      [3, 3, 255, 255, 255],
                      [3, 0, 255, 255, 255],
                      [3, 3, 1, 1, 1],
                      [2, 2, 2, 0, 0],
                      [255, 2, 0, 0, 0]], dtype=np.uint8)
    counts = label_counts(label, (3, 2), 4, IGNORE)
    assert counts.shape == (4, 3, 2) and counts.dtype == np.float32
    # by hand: cell (0, 0) = rows 0-1, cols 0-1: labels 0, 0, 0 and one ignored pixel
    np.testing.assert_array_equal(counts[:, 0, 0], [3, 0, 0, 0])
    # cell (0, 1) = rows 0-1, cols 2-4: 1, 1, 2, 1, 2, 2
    np.testing.assert_array_equal(counts[:, 0, 1], [0, 3, 3, 0])
    # cell (1, 1) = rows 2-4, cols 2-4: six ignored pixels, then 1, 1, 1
    np.testing.assert_array_equal(counts[:, 1, 1], [0, 3, 0, 0])
    # cell (2, 0) = rows 5-6, cols 0-1: 2, 2, ignored, 2
    np.testing.assert_array_equal(counts[:, 2, 0], [0, 0, 3, 0])
    np.testing.assert_array_equal(counts, reference_counts(label, (3, 2), 4))
    assert counts.sum() == np.count_nonzero(label != IGNORE)


def test_label_counts_random_maps_match_the_numpy_histogram_reference() -> None:
    rng = np.random.default_rng(0)
    for (hh, ww), grid, k in [((112, 112), (8, 8), 5), ((64, 90), (5, 7), 21), ((50, 37), (4, 3), 3)]:
        label = rng.integers(0, k, size=(hh, ww)).astype(np.uint8)
        label[rng.random((hh, ww)) < 0.15] = IGNORE
        label[-7:, :] = IGNORE  # bottom padding, as the fixed views have
        np.testing.assert_array_equal(label_counts(label, grid, k, IGNORE), reference_counts(label, grid, k))
    with pytest.raises(ValueError, match="label values must be < 3 or 255"):
        label_counts(np.full((4, 4), 7, np.uint8), (2, 2), 3, IGNORE)


def test_token_loss_is_mmseg_cross_entropy_of_nearest_upsampled_logits() -> None:
    """sum(-counts log softmax) / all pixels == mean over all label pixels (ignored ones in the denominator) of
    the per-pixel cross-entropy after nearest-exact upsampling: the v2 loss, re-derived at full resolution."""
    rng = np.random.default_rng(1)
    b, k, grid, size = 3, 6, (5, 7), (41, 53)
    label = rng.integers(0, k, size=(b, *size))
    label[rng.random((b, *size)) < 0.2] = IGNORE
    logits = torch.randn(b, k, *grid, dtype=torch.float64, requires_grad=True)
    counts = torch.from_numpy(np.stack([label_counts(lab, grid, k, IGNORE) for lab in label])).double()
    ours = token_seg_loss(logits, counts, b * size[0] * size[1])
    up = F.interpolate(logits, size=size, mode="nearest-exact")
    ref = F.cross_entropy(up, torch.from_numpy(label), ignore_index=IGNORE, reduction="sum") / label.size
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    g_ours = torch.autograd.grad(ours, logits)[0]
    g_ref = torch.autograd.grad(ref, logits)[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-14)
    # classes first (K, M) with class_dim=0: the same number
    flat = token_seg_loss(logits.permute(1, 0, 2, 3).reshape(k, -1), counts.permute(1, 0, 2, 3).reshape(k, -1),
                          b * size[0] * size[1], class_dim=0)
    torch.testing.assert_close(flat, ref, rtol=1e-12, atol=0)


def test_masked_mean_pool_matches_a_loop_over_cells() -> None:
    rng = np.random.default_rng(2)
    depth = rng.uniform(0.5, 9.0, size=(23, 31))
    depth[rng.random(depth.shape) < 0.3] = 0.0
    depth[:6, :9] = 0.0  # whole cells without a valid pixel
    grid = (7, 9)
    got = masked_mean_pool(depth, grid)
    rows = np.array([owner(y, 23, 7) for y in range(23)])
    cols = np.array([owner(x, 31, 9) for x in range(31)])
    for i in range(7):
        for j in range(9):
            cell = depth[np.ix_(rows == i, cols == j)]
            valid = cell[cell > 0]
            expected = valid.mean() if valid.size else 0.0
            assert got[i, j] == pytest.approx(expected, rel=1e-6, abs=0), (i, j)
    assert got[0, 0] == 0.0 and got.dtype == np.float32
    # hand case: 4 x 4 onto 2 x 2, top-left cell holds 2, 4, 0 (invalid), 6 -> 4
    hand = np.array([[2, 4, 1, 1], [0, 6, 1, 1], [0, 0, 3, 0], [0, 0, 0, 0]], dtype=np.float64)
    np.testing.assert_allclose(masked_mean_pool(hand, (2, 2)), [[4, 1], [0, 3]])


def _seg_heads(c: int, k: int, n: int) -> list:
    torch.manual_seed(3)
    heads = [LinearSegHead(c, k).double() for _ in range(n)]
    for h in heads:  # non-trivial affine, bias and running statistics
        with torch.no_grad():
            h.bn.weight.uniform_(0.5, 1.5)
            h.bn.bias.uniform_(-0.3, 0.3)
            h.conv_seg.weight.normal_(0, 0.2)
            h.conv_seg.bias.uniform_(-0.1, 0.1)
            h.bn.running_mean.uniform_(-1, 1)
            h.bn.running_var.uniform_(0.5, 2)
    return heads


def test_folded_grid_step_equals_the_modules_forward_in_train_mode() -> None:
    """Logits, loss, every parameter gradient and the BatchNorm running statistics of the one-GEMM grid step
    equal those of ``head(feats)`` in train mode, head by head."""
    b, c, k, hw = 4, 12, 5, (3, 6)
    feats = torch.randn(b, c, *hw, dtype=torch.float64) * 3 + 5  # far from centred, like real ViT features
    counts = torch.from_numpy(np.random.default_rng(4).integers(0, 9, size=(b, k, *hw))).double()
    ref_heads, our_heads = _seg_heads(c, k, 3), _seg_heads(c, k, 3)
    ref_losses = []
    for h in ref_heads:
        h.train()
        loss = token_seg_loss(h(feats), counts, b * 100)
        loss.backward()
        ref_losses.append(loss.detach())
    for h in our_heads:
        h.train()
    batch = centre_batch(feats.permute(1, 0, 2, 3).contiguous())
    logits = seg_grid_train_logits(our_heads, batch)
    assert logits.shape == (b * hw[0] * hw[1], 3, k)
    losses = token_seg_losses(logits, counts.permute(0, 2, 3, 1).reshape(-1, k), b * 100)
    losses.sum().backward()
    for ref, ours, rl, ol in zip(ref_heads, our_heads, ref_losses, losses):
        torch.testing.assert_close(ol.detach(), rl, rtol=1e-12, atol=0)
        for (name, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
            torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours.bn, name), getattr(ref.bn, name), rtol=1e-12, atol=0, msg=name)
    # the logits themselves, against the module in train mode on fresh copies
    fresh = _seg_heads(c, k, 3)
    for j, h in enumerate(fresh):
        h.train()
        torch.testing.assert_close(logits[:, j].detach(), h(feats).detach().permute(0, 2, 3, 1).reshape(-1, k),
                                   rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="eval mode"):
        seg_grid_train_logits([fresh[0].eval()], batch)


def test_split_cls_depth_head_equals_the_module() -> None:
    for c in (24, 200):  # 2C below and above the 256 bins: the module upsamples first / convolves first
        torch.manual_seed(5)
        a = DepthBinsHead(2 * c).double()
        b = DepthBinsHead(2 * c).double()
        b.load_state_dict(a.state_dict())
        patch = torch.randn(2, c, 3, 4, dtype=torch.float64)
        cls = torch.randn(2, c, dtype=torch.float64)
        gt = torch.rand(2, 1, 12, 16, dtype=torch.float64) * 5 + 0.5
        gt[:, :, :2] = 0
        ref = a(depth_head_input(patch, cls))
        ours = depth_head_split_forward(b, patch, cls)
        assert ours.shape == (2, 1, 12, 16)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        depth_loss(ref, gt, 200).backward()
        depth_loss(ours, gt, 200).backward()
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="input channels"):
        depth_head_split_forward(DepthBinsHead(10), torch.randn(1, 4, 2, 2), torch.randn(1, 4))


def test_channels_first_stack_and_derived_cache(tmp_path) -> None:
    rng = np.random.default_rng(6)
    src = FeatureCache(str(tmp_path / "src"), {"k": 1}, {"patch": "float16", "label": "uint8"})
    src.open_for_write()
    items = [rng.standard_normal((5, 3, 4)).astype(np.float16) for _ in range(6)]
    labels = [rng.integers(0, 3, size=(14, 20)).astype(np.uint8) for _ in range(6)]
    for p, lab in zip(items, labels):
        src.append({"patch": p, "label": lab})
    src.finish()
    idx = [4, 1, 5]
    cf = src.stack_channels_first(idx, "patch")
    assert cf.dtype == torch.float32 and cf.shape == (5, 3, 3, 4)
    torch.testing.assert_close(cf, torch.from_numpy(np.stack([items[i] for i in idx]).astype(np.float32))
                               .permute(1, 0, 2, 3))
    dst = FeatureCache(str(tmp_path / "dst"), {"k": 1, "derived": "counts"}, {"counts": "float16"})
    calls = []

    def item(i: int):
        calls.append(i)
        if len(calls) == 4 and not hasattr(item, "failed"):
            item.failed = True
            raise KeyboardInterrupt  # an interrupted derivation resumes where it stopped
        return {"counts": label_counts(src.get(i, "label"), (3, 4), 3, IGNORE)}

    with pytest.raises(KeyboardInterrupt):
        derive_cache(src, dst, item, False, "t")
    again = FeatureCache(str(tmp_path / "dst"), {"k": 1, "derived": "counts"}, {"counts": "float16"})
    derive_cache(src, again, item, False, "t")
    assert again.complete and len(again) == 6 and calls[:3] == [0, 1, 2] and calls[-3:] == [3, 4, 5]
    for i in range(6):
        np.testing.assert_array_equal(again.get(i, "counts"), reference_counts(labels[i], (3, 4), 3))
