"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), NACLIP's post-processing.

NACLIP runs it on the sliding-window logits at the original resolution, before the softmax, with the
normalised image resized (bilinear) to that resolution, 10 iterations and dilations (8, 16)
(sinahmr/NACLIP@0cac3a6 ``naclip.py``: ``pamr_steps=10``, ``pamr_stride=(8, 16)``).

Per dilation d, every pixel has 8 neighbours at offsets d·(dy, dx), (dy, dx) ∈ {-1, 0, 1}² \\ {(0, 0)},
read with replicate padding. The affinity to neighbour p is
``softmax_p( mean_channels( -|I_p - I| / (1e-8 + 0.1 · std) ) )`` where ``std`` is the (unbiased)
standard deviation of the image over the 9 positions of every dilation together; each iteration
replaces the mask by the affinity-weighted sum of its neighbours' values.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _neighbours(x: torch.Tensor, dilations: Sequence[int], with_centre: bool) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, P, H, W): shifted copies of ``x`` with replicate padding."""
    h, w = x.shape[-2:]
    out: List[torch.Tensor] = []
    for d in dilations:
        xp = F.pad(x, [d, d, d, d], mode="replicate")
        offs = _OFFSETS + ([(0, 0)] if with_centre else [])
        for dy, dx in offs:
            out.append(xp[..., d + dy * d: d + dy * d + h, d + dx * d: d + dx * d + w])
    return torch.stack(out, dim=2)


@torch.no_grad()
def pamr(image: torch.Tensor, mask: torch.Tensor, num_iter: int = 10,
         dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """Refine ``mask`` (B, C, H, W) with the affinities of ``image`` (B, K, H, W) of the same size."""
    if mask.shape[-2:] != image.shape[-2:]:
        mask = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=True)
    std = _neighbours(image, dilations, with_centre=True).std(dim=2, keepdim=True)
    diff = (_neighbours(image, dilations, with_centre=False) - image.unsqueeze(2)).abs()
    aff = torch.softmax((-diff / (1e-8 + 0.1 * std)).mean(1, keepdim=True), dim=2)
    for _ in range(int(num_iter)):
        mask = (_neighbours(mask, dilations, with_centre=False) * aff).sum(2)
    return mask
