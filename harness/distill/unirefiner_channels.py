"""UniRefiner's lazy-channel mask: feature channels that are large and nearly constant across tokens make every
pair of tokens look alike under cosine similarity, so up to five of them are zeroed inside the losses' and
detectors' cosines (never in the model). Greedy selection as ``run_greedy_channel_mask`` in
``unirefiner/models/channel_mask.py`` of github.com/CongpeiQiu/UniRefiner @ 38f4e71b (arXiv:2605.19622).

Unrelated token pairs: token t of image b with token T-1-t of image B-1-b (``flip(0).flip(1)``). Each round
scores channels by (mean product over those pairs of the normalised features) x (mean^2 / var over tokens,
averaged over images), re-evaluates the 16 best by the mean unrelated cosine once the channel is removed, and
masks the best one; it stops after masking a channel that brings the mean to <= 0.2, when the gain is
< 0.005, or after five channels.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn.functional as F

#: ``channel_mask_samples`` 64, ``channel_mask_tokens_per_image`` 128, ``channel_mask_threshold`` 0.2,
#: ``channel_mask_max_channels`` 5, ``channel_mask_candidate_pool`` 16, ``channel_mask_min_delta`` 0.005
#: (defaults read with getattr in channel_mask.py)
SAMPLES, TOKENS_PER_IMAGE = 64, 128
THRESHOLD, MAX_CHANNELS, CANDIDATES, MIN_DELTA = 0.2, 5, 16, 0.005
EPS = 1e-6  # channel_mask.py EPS


def unrelated_mean(x: torch.Tensor) -> float:
    """Mean cosine of unrelated pairs of normalised features (B, T, C); 0 for one image."""
    return float((x * x.flip(0).flip(1)).sum(-1).mean()) if x.shape[0] >= 2 else 0.0


def _without(x: torch.Tensor, channels: List[int]) -> torch.Tensor:
    """Mean unrelated cosine of normalised ``x`` after removing each channel (renormalising the rest)."""
    pair = x.flip(0).flip(1)
    base = (x * pair).sum(-1)
    idx = torch.tensor(channels, dtype=torch.long)
    a, b = x[..., idx].permute(2, 0, 1), pair[..., idx].permute(2, 0, 1)
    w = torch.rsqrt((1 - a.pow(2)).clamp_min(EPS)) * torch.rsqrt((1 - b.pow(2)).clamp_min(EPS))
    return ((base.unsqueeze(0) - a * b) * w).mean(dim=(1, 2))


@torch.no_grad()
def select_lazy_channels(bank: torch.Tensor) -> Dict[str, Any]:
    """(B, T, C) raw features -> ``{"masked_channels", "final_unrelated_mean", "stop_reason"}``."""
    raw = bank.float().clone()
    norm = F.normalize(raw, dim=-1)
    current = unrelated_mean(norm)
    masked: List[int] = []
    reason = "max_channels"
    if raw.shape[0] < 2:
        return {"masked_channels": [], "final_unrelated_mean": current, "stop_reason": "too_few_images"}
    for _ in range(MAX_CHANNELS):
        bias = (norm * norm.flip(0).flip(1)).mean(dim=(0, 1))
        stability = (raw.mean(1).pow(2) / (raw.var(1, unbiased=False) + EPS)).mean(0)
        score = bias * stability
        if masked:
            score[masked] = float("-inf")
        cands = score.topk(min(CANDIDATES, score.numel())).indices.tolist()
        after = _without(norm, cands)
        best = int(after.argmin())
        channel, value = int(cands[best]), float(after[best])
        gain = current - value
        if value <= THRESHOLD:
            masked.append(channel)
            current, reason = value, "threshold"
            break
        if gain < MIN_DELTA:
            reason = "min_delta"
            break
        masked.append(channel)
        raw[..., channel] = 0
        norm = F.normalize(raw, dim=-1)
        current = value
    return {"masked_channels": masked, "final_unrelated_mean": current, "stop_reason": reason}


def apply_mask(x: torch.Tensor, channels: List[int]) -> torch.Tensor:
    """``x`` with ``channels`` of the last dimension zeroed (before any cosine)."""
    if not channels:
        return x
    keep = x.new_ones(x.shape[-1])
    keep[channels] = 0
    return x * keep
