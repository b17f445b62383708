"""Depth-probe losses: AdaBins SigLoss and the multi-scale log-gradient loss, both over valid pixels.

Sources: DINOv2 ``eval/depth/models/losses/{sigloss,gradientloss}.py`` (facebookresearch/dinov2@b8931f7b)
as used by DVT's NYU linear config (Jiawei-Yang/Denoising-ViT@82704df
``evaluation/configs/vitb_nyu_linear_config.py``): total = 1.0 x SigLoss(warm-up 100 iterations) + 0.5 x
GradientLoss, with eps = 1e-3 inside the logs and valid = gt > 0 (and gt <= max_depth when given).

The gradient loss here differences the log-error map along the two *spatial* axes at strides 1, 2, 4
and 6, as its MegaDepth origin, DINOv3 and probe3d do. DINOv2's copy slices the first two dimensions
of a (B, 1, H, W) tensor, i.e. batch and channel (dinov2@b8931f7b ``gradientloss.py``): identically 0
for 2 images per GPU and cross-image otherwise. We do not reproduce that bug; ``tests/probes/test_losses.py``
shows the two give different answers.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

#: a sum over the torchrun ranks whose backward sums the ranks' gradients (``Dist.differentiable_sum``); with
#: it the losses below are those of the *global* batch, each rank holding a slice (see :func:`sig_loss`)
RankSum = Callable[[torch.Tensor], torch.Tensor]

# The constants below are the DVT recipe's values and this module's defaults; the depth evaluators pass the
# protocol's ``loss`` entry instead (harness/protocols/depth/*.yaml, same values and sources).
#: eps inside log(d + eps) in both losses (DINOv2 sigloss.py / gradientloss.py: "avoid grad explode")
LOG_EPS = 1e-3
#: SigLoss: sqrt(Var(g) + 0.15 mean(g)^2), i.e. Eigen's scale-invariant loss with lambda = 0.85
#: (dinov2@b8931f7b eval/depth/models/losses/sigloss.py; Eigen et al., NeurIPS 2014, arXiv:1406.2283)
SIGLOSS_MEAN_WEIGHT = 0.15
#: the first 100 iterations use sqrt(0.15 mean(g)^2) only (DINOv2 SigLoss warm_up=True, warm_iter=100)
SIGLOSS_WARM_ITERS = 100
#: loss weights of DVT's vitb_nyu_linear_config.py: SigLoss 1.0, GradientLoss 0.5
SIGLOSS_WEIGHT = 1.0
GRADIENT_LOSS_WEIGHT = 0.5
#: GradientLoss scales: the full map and strided subsamplings ::2, ::4, ::6 (``[::2*i] for i in 1..3``)
GRADIENT_STRIDES = (1, 2, 4, 6)


def valid_mask(gt: torch.Tensor, max_depth: Optional[float] = None) -> torch.Tensor:
    """DINOv2 loss mask: gt > 0, and gt <= max_depth when given."""
    m = gt > 0
    if max_depth is not None:
        m = m & (gt <= max_depth)
    return m


def sig_loss(pred: torch.Tensor, gt: torch.Tensor, max_depth: Optional[float] = None,
             warm_up: bool = False, eps: float = LOG_EPS, mean_weight: float = SIGLOSS_MEAN_WEIGHT,
             rank_sum: Optional[RankSum] = None) -> torch.Tensor:
    """AdaBins scale-invariant log loss over all valid pixels of the batch.

    L = sqrt(Var(g) + 0.15 mean(g)^2), g = log(p + eps) - log(d + eps), ``torch.var`` unbiased as in
    DINOv2; with ``warm_up`` only sqrt(0.15 mean(g)^2). The caller passes ``warm_up=iteration < 100``, so
    the warm-up follows the iteration counter (and survives a resume) rather than a mutable call count.

    With ``rank_sum`` (torchrun, the global batch split over ranks) Var and mean come from the float64 sums
    (Σg, Σg², N) over all ranks: every rank gets the loss of the whole global batch, not of its slice, so
    the run is the single-process one (Var = (Σg² − (Σg)²/N) / (N − 1), the unbiased variance).
    """
    m = valid_mask(gt, max_depth)
    g = torch.log(pred[m] + eps) - torch.log(gt[m] + eps)
    if rank_sum is not None:
        gd = g.double()
        stats = rank_sum(torch.stack([gd.sum(), (gd * gd).sum(), gd.new_tensor(float(g.numel()))]))
        n = float(stats[2].detach())
        if n < 2:
            return pred.sum() * 0.0 + stats.sum() * 0.0
        mean = stats[0] / n
        if warm_up:
            return torch.sqrt(mean_weight * mean ** 2).to(pred.dtype)
        var = (stats[1] - stats[0] * stats[0] / n) / (n - 1)
        return torch.sqrt(var + mean_weight * mean ** 2).to(pred.dtype)
    if g.numel() < 2:  # no (or one) valid pixel: no signal, and a graph-connected zero instead of NaN
        return pred.sum() * 0.0
    if warm_up:
        return torch.sqrt(mean_weight * g.mean() ** 2)
    return torch.sqrt(torch.var(g) + mean_weight * g.mean() ** 2)


def gradient_loss(pred: torch.Tensor, gt: torch.Tensor, max_depth: Optional[float] = None, eps: float = LOG_EPS,
                  strides: Sequence[int] = GRADIENT_STRIDES, rank_sum: Optional[RankSum] = None) -> torch.Tensor:
    """Multi-scale log-gradient matching loss, differences along the spatial axes (last two dims).

    For each stride s in (1, 2, 4, 6): R = (log(p + eps) - log(d + eps)) * mask on ``[..., ::s, ::s]``,
    sum |R[y] - R[y+2]| over pairs of valid pixels two rows apart plus the same two columns apart,
    divided by the number of valid pixels at that scale; the scales are summed (DINOv2 gradientloss.py,
    with its slicing moved to the spatial dimensions). With ``rank_sum`` the sums and pixel counts are those
    of the global batch (see :func:`sig_loss`).
    """
    total = pred.new_zeros(())
    for s in strides:
        p = pred[..., ::s, ::s]
        d = gt[..., ::s, ::s]
        m = valid_mask(d, max_depth).to(p.dtype)
        n = m.sum()
        r = (torch.log(p + eps) - torch.log(d + eps)) * m
        v = (r[..., :-2, :] - r[..., 2:, :]).abs() * (m[..., :-2, :] * m[..., 2:, :])
        h = (r[..., :, :-2] - r[..., :, 2:]).abs() * (m[..., :, :-2] * m[..., :, 2:])
        if rank_sum is not None:
            num, n = rank_sum(torch.stack([(v.sum() + h.sum()).double(), n.double()]))
            total = total + (num / n.clamp(min=1)).to(total.dtype)
            continue
        total = total + (v.sum() + h.sum()) / n.clamp(min=1)  # no valid pixel: 0, not NaN
    return total


def depth_loss(pred: torch.Tensor, gt: torch.Tensor, iteration: int, max_depth: Optional[float] = None,
               warm_iters: int = SIGLOSS_WARM_ITERS, sigloss_weight: float = SIGLOSS_WEIGHT,
               sigloss_mean_weight: float = SIGLOSS_MEAN_WEIGHT, gradient_weight: float = GRADIENT_LOSS_WEIGHT,
               gradient_strides: Sequence[int] = GRADIENT_STRIDES, log_eps: float = LOG_EPS,
               rank_sum: Optional[RankSum] = None) -> torch.Tensor:
    """DVT NYU linear loss: 1.0 x SigLoss (warm-up for the first ``warm_iters`` iterations) + 0.5 x GradientLoss.

    The keyword arguments are the protocol's ``loss`` entry (``depth_loss(..., **settings["loss"])``);
    ``rank_sum`` makes it the loss of the global batch under torchrun (:func:`sig_loss`).
    """
    return (sigloss_weight * sig_loss(pred, gt, max_depth, warm_up=iteration < warm_iters, eps=log_eps,
                                      mean_weight=sigloss_mean_weight, rank_sum=rank_sum)
            + gradient_weight * gradient_loss(pred, gt, max_depth, eps=log_eps, strides=gradient_strides,
                                              rank_sum=rank_sum))


def depth_losses(preds: torch.Tensor, gt: torch.Tensor, iteration: int, max_depth: Optional[float] = None,
                 warm_iters: int = SIGLOSS_WARM_ITERS, sigloss_weight: float = SIGLOSS_WEIGHT,
                 sigloss_mean_weight: float = SIGLOSS_MEAN_WEIGHT, gradient_weight: float = GRADIENT_LOSS_WEIGHT,
                 gradient_strides: Sequence[int] = GRADIENT_STRIDES, log_eps: float = LOG_EPS) -> torch.Tensor:
    """``[depth_loss(p, gt, ...) for p in preds]`` as one (heads,) tensor: several heads against one target.

    Why: a head grid's predictions at the token grid are small, so the per-head loss is dozens of tiny
    operations each; here every operation runs once for all heads (the log error map is computed once and
    strided for the gradient loss's scales, the target's logs and masks once). Same formulas as
    :func:`sig_loss` and :func:`gradient_loss`, summed in another order.

    Args:
        preds: (heads, B, 1, H, W) predictions; gt: (B, 1, H, W) target, shared by the heads.
    """
    if preds.shape[1:] != gt.shape:
        raise ValueError(f"predictions (heads, *target) {tuple(preds.shape)} do not match target {tuple(gt.shape)}")
    heads = preds.shape[0]
    dims = tuple(range(1, preds.dim()))
    err = torch.log(preds + log_eps) - torch.log(gt + log_eps)  # (heads, B, 1, H, W)
    m = valid_mask(gt, max_depth)
    g = err[:, m]  # (heads, valid pixels)
    if g.shape[1] < 2:
        sig = preds.sum(dim=dims) * 0.0
    elif iteration < warm_iters:
        sig = torch.sqrt(sigloss_mean_weight * g.mean(dim=1) ** 2)
    else:
        sig = torch.sqrt(torch.var(g, dim=1) + sigloss_mean_weight * g.mean(dim=1) ** 2)
    grad = preds.new_zeros(heads)
    for s in gradient_strides:
        mf = valid_mask(gt[..., ::s, ::s], max_depth).to(preds.dtype)
        r = err[..., ::s, ::s] * mf
        v = (r[..., :-2, :] - r[..., 2:, :]).abs() * (mf[..., :-2, :] * mf[..., 2:, :])
        h = (r[..., :, :-2] - r[..., :, 2:]).abs() * (mf[..., :, :-2] * mf[..., :, 2:])
        grad = grad + (v.sum(dim=dims) + h.sum(dim=dims)) / mf.sum().clamp(min=1)
    return sigloss_weight * sig + gradient_weight * grad
