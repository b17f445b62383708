"""The pieces that make a torchrun run equal the single-process one, checked without launching processes.

* rank r of w gets exactly its consecutive part of the same global batch (probe samplers, distill batch plans);
* a global batch the ranks cannot split is refused with the option named;
* sharded evaluations reduce to the single-process numbers (depth per-image means from sums and counts, the
  artifact measures' sums and gathered cosines), with a fake 2-rank all-reduce;
* the depth loss of the global batch from per-rank sums equals the loss of the whole batch in one process
  (value and gradient), against a numpy re-implementation of SigLoss.
"""
from __future__ import annotations

import math
from typing import Any, List, Sequence

import numpy as np
import pytest
import torch

from harness.distill.common import cycle_batches, rank_slices
from harness.distill.phreg import batch_plan
from harness.errors import ConfigError
from harness.evaluators.artifacts import ArtifactStats
from harness.metrics.depth import DEPTH_METRICS, DepthAccumulator
from harness.probes.data import IterationBatches
from harness.probes.losses import depth_loss, gradient_loss, sig_loss
from harness.runtime import Dist


# -- rank-aware batches ----------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_gets_its_consecutive_part_of_the_same_global_batch(world: int) -> None:
    single = list(IterationBatches(10, 8, 3, 9, seed=5))
    ranks = [list(IterationBatches(10, 8, 3, 9, seed=5, dist=Dist(rank=r, world_size=world))) for r in range(world)]
    b = 8 // world
    assert len(single) == 6 and all(len(x) == 6 for x in ranks)
    for it, whole in enumerate(single):
        assert len(whole) == 8 and [slot for _, slot, _ in whole] == list(range(8))
        for r in range(world):
            assert ranks[r][it] == whole[r * b:(r + 1) * b]  # (iteration, global slot, index): same augmentation
        assert sum((ranks[r][it] for r in range(world)), []) == whole


def test_distill_batch_plans_split_by_global_slot() -> None:
    """PH-Reg's crop seeds come from the global slot, so 2 ranks x 2 draw the crops of 1 rank x 4."""
    single = [b for _, b in zip(range(5), batch_plan(9, 4, 3, 2))]
    halves = [[b for _, b in zip(range(5), rank_slices(batch_plan(9, 4, 3, 2), Dist(rank=r, world_size=2)))]
              for r in range(2)]
    for step in range(5):
        assert halves[0][step] + halves[1][step] == single[step]
        assert halves[0][step] != halves[1][step]
    plain = [b for _, b in zip(range(3), rank_slices(cycle_batches(7, 6, 0, 0), Dist(rank=2, world_size=3)))]
    assert plain == [b[4:6] for _, b in zip(range(3), cycle_batches(7, 6, 0, 0))]


def test_a_global_batch_the_ranks_cannot_split_is_refused_naming_the_option() -> None:
    with pytest.raises(ConfigError, match="batch_size 16 does not split over 3 torchrun processes"):
        IterationBatches(10, 16, 0, 5, seed=0, dist=Dist(rank=0, world_size=3))
    with pytest.raises(ConfigError, match="--batch-size 6 does not split over 4 torchrun processes"):
        next(rank_slices(cycle_batches(20, 6, 0, 0), Dist(rank=1, world_size=4)))


def test_evaluation_shards_cover_every_item_once() -> None:
    items = list(range(11))
    parts = [Dist(rank=r, world_size=3).shard(items) for r in range(3)]
    assert parts[1] == [1, 4, 7, 10]
    assert sorted(sum(parts, [])) == items


# -- depth metrics: sums and counts ----------------------------------------------------------------
def _numpy_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    """rmse, abs_rel and delta1 of one image over 1e-3 < gt < 10 (toolbox formulas), NaN without valid pixels."""
    m = (gt > 1e-3) & (gt < 10)
    if not m.any():
        return {"rmse": math.nan, "abs_rel": math.nan, "delta1": math.nan}
    p, d = pred[m].astype(np.float64), gt[m].astype(np.float64)
    return {"rmse": float(np.sqrt(np.mean((d - p) ** 2))), "abs_rel": float(np.mean(np.abs(d - p) / d)),
            "delta1": float(np.mean(np.maximum(d / p, p / d) < 1.25))}


def test_depth_means_reduce_from_sums_and_counts_with_a_fake_two_rank_all_reduce() -> None:
    gen = torch.Generator().manual_seed(0)
    gts = [torch.rand(6, 7, generator=gen) * 5 + 0.5 for _ in range(5)]
    gts[3] = torch.zeros(6, 7)  # no valid pixel: NaN, left out of the mean (nanmean over images)
    preds = [g * (1 + 0.3 * torch.randn(6, 7, generator=gen)).abs() + 0.1 for g in gts]
    accs = [DepthAccumulator(eigen_crop=False) for _ in range(2)]
    for i, (p, g) in enumerate(zip(preds, gts)):
        accs[i % 2].update(p, g)  # rank i % 2 measures image i, as Dist.shard does
    together = accs[0].totals() + accs[1].totals()
    for acc in accs:
        acc.all_reduce(lambda t: t.copy_(together))
    ref = [_numpy_metrics(p.numpy(), g.numpy()) for p, g in zip(preds, gts)]
    for acc in accs:
        assert len(acc) == 5
        out = acc.compute()
        assert set(out) == set(DEPTH_METRICS)
        for k in ("rmse", "abs_rel", "delta1"):
            assert out[k] == pytest.approx(np.nanmean([r[k] for r in ref]), rel=1e-12)
    single = DepthAccumulator(eigen_crop=False)
    for p, g in zip(preds, gts):
        single.update(p, g)
    for k, v in single.compute().items():
        assert accs[1].compute()[k] == pytest.approx(v, rel=1e-12), k
    with pytest.raises(ValueError, match="reduced"):
        accs[0].update(preds[0], gts[0])


# -- the depth loss of the global batch --------------------------------------------------------------
def _numpy_sig_loss(pred: np.ndarray, gt: np.ndarray, eps: float = 1e-3, lam: float = 0.15) -> float:
    m = gt > 0
    g = np.log(pred[m].astype(np.float64) + eps) - np.log(gt[m].astype(np.float64) + eps)
    return float(np.sqrt(g.var(ddof=1) + lam * g.mean() ** 2))


def _split_with_fake_rank_sum(fn, preds: Sequence[torch.Tensor], gts: Sequence[torch.Tensor]) -> List[Any]:
    """Rank 0's loss when rank 1 holds the second slice: rank 1's sums are captured first, then added."""
    captured: List[torch.Tensor] = []

    def capture(t: torch.Tensor) -> torch.Tensor:
        captured.append(t.detach().clone())
        return t

    fn(preds[1], gts[1], capture)
    it = iter(captured)
    return fn(preds[0], gts[0], lambda t: t + next(it))


@pytest.mark.parametrize("iteration", [0, 50])  # SigLoss warm-up (mean term only) and the full loss
def test_depth_loss_from_rank_sums_is_the_global_batch_loss(iteration: int) -> None:
    gen = torch.Generator().manual_seed(1)
    gt = torch.rand(4, 1, 20, 24, generator=gen) * 8 + 0.2
    gt[gt < 1.0] = 0.0  # invalid pixels, unevenly spread over the images
    gt[3] = 0.0  # one image without any valid pixel
    base = (gt + 0.5 * torch.rand(4, 1, 20, 24, generator=gen)).clamp_min(0.05)
    base[2:] *= 1.6  # the second slice over-predicts: the global batch's variance exceeds each slice's
    full = base.clone().requires_grad_(True)
    whole = depth_loss(full, gt, iteration, warm_iters=10)
    whole.backward()
    half = base[:2].clone().requires_grad_(True)

    def fn(p, g, rank_sum):
        return depth_loss(p, g, iteration, warm_iters=10, rank_sum=rank_sum)

    split = _split_with_fake_rank_sum(fn, [half, base[2:]], [gt[:2], gt[2:]])
    assert float(split.detach()) == pytest.approx(float(whole.detach()), rel=1e-5)
    split.backward()  # rank 0's share of the gradient: the whole batch's gradient on its images
    assert torch.allclose(half.grad, full.grad[:2], rtol=1e-4, atol=1e-7)
    if iteration >= 10:
        sig = sig_loss(base, gt)
        assert float(sig) == pytest.approx(_numpy_sig_loss(base.numpy(), gt.numpy()), rel=1e-5)
        grad_part = _split_with_fake_rank_sum(lambda p, g, s: gradient_loss(p, g, rank_sum=s),
                                              [base[:2], base[2:]], [gt[:2], gt[2:]])
        assert float(grad_part) == pytest.approx(float(gradient_loss(base, gt)), rel=1e-5)
        # and the split really differs from the mean of per-slice losses (what a per-rank loss would train on)
        per_rank = (float(sig_loss(base[:2], gt[:2])) + float(sig_loss(base[2:], gt[2:]))) / 2
        assert abs(per_rank - float(sig)) > 1e-3


# -- the artifact measures -------------------------------------------------------------------------
class _FakeTwoRanks(Dist):
    """Rank 0 of 2, the other rank's numbers given: ``total`` adds them, ``gather`` lists both."""

    def __init__(self, other: ArtifactStats) -> None:
        super().__init__(rank=0, world_size=2)
        self.other = other

    def total(self, values):
        o = self.other
        theirs = [o.images, o.tokens, o.high, o.low, o.cv_sum, o.pearson_unscored]
        return [float(a) + float(b) for a, b in zip(values, theirs)]

    def gather(self, obj):
        return [obj, (self.other.cosines, self.other.pearson)]


def test_artifact_sums_and_cosines_reduce_to_the_single_process_numbers() -> None:
    gen = torch.Generator().manual_seed(2)
    patch = torch.randn(6, 8, 5, 5, generator=gen)
    patch[:, :, 1, 2] *= 9  # a high-norm token in every image
    target = patch + 0.3 * torch.randn(6, 8, 5, 5, generator=gen)
    single, ranks = ArtifactStats(), [ArtifactStats(), ArtifactStats()]
    single.add_tokens(patch, target, 3.5)
    for i, v in enumerate([0.5, None, 0.25, 0.75]):
        single.add_pearson(v)
        ranks[i % 2].add_pearson(v)
    ranks[0].add_tokens(patch[0::2], target[0::2], 3.5)
    ranks[1].add_tokens(patch[1::2], target[1::2], 3.5)
    ranks[0].all_reduce(_FakeTwoRanks(ranks[1]))
    a, b = ranks[0].compute([50, 90, 99], True), single.compute([50, 90, 99], True)
    assert set(a) == set(b) and a["outliers_high"] > 0
    for k in b:
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    assert ranks[0].images == 6 and ranks[0].pearson_unscored == 1 and sorted(ranks[0].pearson) == [0.25, 0.5, 0.75]
    # the percentile needs every token: the median cosine in numpy over both ranks' tokens
    cos = np.concatenate([c.numpy().ravel() for c in ranks[0].cosines])
    assert cos.size == 6 * 25 and a["cos_p50"] == pytest.approx(float(np.quantile(cos, 0.5)), rel=1e-6)


def test_dvt_stage1_ranks_start_from_their_slice_of_the_batch_initialisation() -> None:
    from harness.distill.dvt import Stage1Settings, Stage1State

    s = Stage1Settings(resolution=32, views=2, steps=2, batch=4, samples=8, levels=2, features=2)
    single = Stage1State(16, 2, s, torch.device("cpu"))
    single.start_chunk(3, 4)
    ranks = [Stage1State(16, 2, s, torch.device("cpu"), Dist(rank=r, world_size=2)) for r in range(2)]
    for r, st in enumerate(ranks):
        st.start_chunk(3, 4)
        assert st.rows(4) == (2 * r, 2 * r + 2) and st.n == 4
        assert torch.equal(st.artifact, single.artifact)  # G: the same on every rank
        for mine, whole in zip([*st.fields.parameters(), *st.residual.parameters()],
                               [*single.fields.parameters(), *single.residual.parameters()]):
            assert mine.shape[0] == 2 and torch.equal(mine, whole[2 * r:2 * r + 2])
    with pytest.raises(ConfigError, match="written by 1 process"):
        ranks[0].load_state_dict(single.state_dict())
