"""GlobalBatchNorm2d: with the batch split over ranks, rank 0 normalises with the statistics of the whole batch.

The all-reduce is replaced by one that adds the other rank's per-channel [Σx, Σx², count] computed here in numpy,
so the test runs in one process; the reference is BatchNorm written out in numpy over the whole batch.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from harness.probes.sync_bn import GlobalBatchNorm2d, globalize_batchnorm
from harness.runtime import Dist


def test_rank0_normalises_with_the_whole_batch_statistics(monkeypatch):
    import torch.distributed as dist
    import torch.distributed.nn.functional as dnf

    rng = np.random.default_rng(0)
    full = rng.normal(2.0, 3.0, size=(6, 5, 4, 3)).astype(np.float32)  # global batch 6 = rank 0: 2, rank 1: 4
    mine, other = full[:2], full[2:]
    o = other.transpose(1, 0, 2, 3).reshape(5, -1).astype(np.float64)
    other_stats = np.concatenate([o.sum(1), (o * o).sum(1), [o.shape[1]]])
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dnf, "all_reduce", lambda t, *a, **k: t + torch.from_numpy(other_stats).to(t.dtype))

    bn = GlobalBatchNorm2d(5, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
        bn.bias.copy_(torch.linspace(-1, 1, 5))
    bn.train()
    y = bn(torch.from_numpy(mine)).detach().numpy()

    f = full.transpose(1, 0, 2, 3).reshape(5, -1).astype(np.float64)
    mean, var = f.mean(1), f.var(1)  # biased, as BatchNorm normalises with
    w, b = np.linspace(0.5, 1.5, 5), np.linspace(-1, 1, 5)
    ref = (mine - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5) * w[None, :, None, None] \
        + b[None, :, None, None]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    n = f.shape[1]
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.9 * 0 + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), 0.9 * 1 + 0.1 * var * n / (n - 1), rtol=1e-5)
    assert int(bn.num_batches_tracked) == 1


def test_single_process_and_eval_are_plain_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    ref, bn = nn.BatchNorm2d(3), GlobalBatchNorm2d(3)
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        bn.train(mode == "train")
        assert torch.equal(bn(x), ref(x))
    assert torch.equal(bn.running_var, ref.running_var)


def test_globalize_replaces_batchnorm_keeping_its_state():
    head = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)))
    with torch.no_grad():
        head[0].running_mean.fill_(0.25)
        head[0].weight.fill_(2.0)
    globalize_batchnorm(head)
    assert type(head[0]) is GlobalBatchNorm2d and type(head[1][1]) is GlobalBatchNorm2d
    assert float(head[0].running_mean[0]) == 0.25 and float(head[0].weight.detach()[0]) == 2.0


def test_one_rank_gradient_average_is_a_no_op():
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    Dist().average_gradients([p])
    assert p.grad.tolist() == [1.0, 2.0, 3.0] and Dist().mean([1.5, 2.5]) == [1.5, 2.5]
