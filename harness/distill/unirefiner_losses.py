"""UniRefiner's three losses on L2-normalised tokens (arXiv:2605.19622; ``unirefiner/method/losses.py`` of
github.com/CongpeiQiu/UniRefiner @ 38f4e71b). Total: ``L_ref + 0.1 L_abs + 0.4 [progress > 0.1] L_scd``.

Shapes: crop tokens ``s`` and targets ``t`` (P, N, D) for P crops of N tokens; student full-image tokens
``z`` (P, N, D) and ring tokens ``g`` (P, R, D) of the crop's image; teacher negatives ``f`` (P, M, D);
spurious targets ``v`` (P, S, D). ``clean`` (P, N) marks the crop tokens every detector passed.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

#: temperature of every term (``temp: float = 0.2`` in compute_refinement_loss / compute_spatial_consistency_loss)
TAU = 0.2
#: gradient stop below this student-image/ring similarity (``detach_low_similarity_gradient(..., 0.55)``)
RING_SPARSITY = 0.55
#: the weights of the total loss and SCD's start (``UniRefinerMethod.forward``: 0.1, 0.4, ``train_stage > 0.1``)
ABS_WEIGHT, SCD_WEIGHT, SCD_START = 0.1, 0.4, 0.1
#: register-crop auxiliary term: weight 0.2 on the top 10% (``compute_register_absorption_loss``)
CROP_AFFINITY_WEIGHT, CROP_AFFINITY_TOP = 0.2, 10
#: the balanced uniformity's anchor above the sparsity threshold (``apply_teacher_sparsity_balance``)
BALANCE_MARGIN = 0.1
MINMAX_EPS, LOG_EPS = 1e-10, 1e-10  # compute_spatial_consistency_loss


def clean_or_all(clean: torch.Tensor) -> torch.Tensor:
    """All tokens when the detectors rejected every one (``valid_clean_tokens_or_all``)."""
    return clean if bool(clean.any()) else torch.ones_like(clean, dtype=torch.bool)


def sparsity_threshold(targets: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """theta: mean cosine of clean targets with the same list reversed -- the similarity of unrelated tokens."""
    t = targets[clean_or_all(clean)]
    return (t * t.flip(0)).sum(-1).mean()


def stop_below(sim: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Same values; no gradient where ``sim < threshold`` (those pairs are already apart)."""
    return torch.where(sim.detach() < threshold, sim.detach(), sim)


def refinement_loss(s: torch.Tensor, t: torch.Tensor, clean: torch.Tensor, f: torch.Tensor, z: torch.Tensor,
                    g: torch.Tensor, uniformity: float, tau: float = TAU) -> Tuple[torch.Tensor, torch.Tensor]:
    """L_ref and theta: InfoNCE of clean crop tokens on their targets against the teacher tokens ``f``, plus the
    push of student image tokens ``z`` away from the ring ``g``."""
    with torch.no_grad():
        valid = clean_or_all(clean)
        theta = sparsity_threshold(t, valid)
    positive = (s * t).sum(-1)
    negatives = torch.logsumexp(stop_below(s @ f.transpose(1, 2), theta) / tau, dim=-1)
    ring = torch.logsumexp(stop_below(z @ g.transpose(1, 2), RING_SPARSITY) / tau, dim=-1).mean()
    return -(positive / tau - uniformity * negatives)[valid].mean() + ring, theta


def snap(tokens: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Each token replaced by its most similar token of ``pool`` (P, M, D) -- "target snapping"."""
    idx = (tokens @ pool.transpose(1, 2)).argmax(-1)
    return torch.gather(pool, 1, idx.unsqueeze(-1).expand(-1, -1, pool.shape[-1]))


def absorption_loss(g: torch.Tensor, s: torch.Tensor, v: torch.Tensor, theta: torch.Tensor,
                    tau: float = TAU) -> torch.Tensor:
    """L_abs: each ring token aligns with its best spurious target, keeps a weak affinity to image content (the
    top 10% of ring-to-crop maxima above theta) and the ring spreads over different targets."""
    v = v.detach()
    align, idx = (g @ v.transpose(1, 2)).max(-1)
    crop = (g @ s.detach().transpose(1, 2)).max(-1).values
    k = max((crop.shape[1] + CROP_AFFINITY_TOP - 1) // CROP_AFFINITY_TOP, 1)
    top = crop.topk(k, dim=-1).values
    keep = top > theta
    crop_term = top[keep].mean() if bool(keep.any()) else top.new_zeros(())
    matched = torch.gather(v, 1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1]))
    sim = g @ matched.transpose(1, 2)
    anchor = (theta + BALANCE_MARGIN).detach().to(sim.dtype)
    balanced = torch.where(sim.detach() < theta, anchor.expand_as(sim), sim)
    spread = torch.logsumexp(balanced / tau, dim=-1).mean()
    return -align.mean() / tau - CROP_AFFINITY_WEIGHT * crop_term / tau + spread


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    return (x - lo) / (hi - lo + MINMAX_EPS)


def scd_loss(s: torch.Tensor, e: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """L_scd: cross-entropy between row-softmaxed, min-max-scaled self-similarities of the wide-ring crop tokens
    ``e`` (target, no gradient) and of the crop tokens ``s`` (one side detached), as in CLIPRefiner's SCD."""
    with torch.no_grad():
        q = F.softmax(_minmax(e @ e.transpose(1, 2)) / tau, dim=-1)
    p = F.softmax(_minmax(s @ s.detach().transpose(1, 2)) / tau, dim=-1)
    return -(q * torch.log(p + LOG_EPS)).sum(-1).mean()


def total_loss(ref: torch.Tensor, absorb: torch.Tensor, scd: torch.Tensor, progress: float) -> torch.Tensor:
    return ref + ABS_WEIGHT * absorb + (SCD_WEIGHT * scd if progress > SCD_START else 0.0 * scd)
