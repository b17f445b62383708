"""Label-free measures of artifact tokens, and the label-based Pearson score of PH-Reg Table S.4.

Artifact tokens are not always high-norm: in some CLIP models they are *low*-norm (Chen et al., "Vision
Transformers with Self-Distilled Registers" (PH-Reg), NeurIPS 2025, arXiv:2505.21501, Fig. 6-7). So
outliers are counted on both sides, per image, with the modified z-score of Iglewicz & Hoaglin ("How to
Detect and Handle Outliers", ASQC 1993): ``M = 0.6745 (x - median) / MAD``, an outlier when ``|M| > 3.5``.
The median and MAD are robust to the outliers themselves, unlike a mean/std rule.

Shift consistency follows PH-Reg Fig. 5: the cosine of each token to its multi-view (TTA) target, read at
the 50/70/90/95/99th percentiles of *dissimilarity* (the 99th is the 1% least similar tokens).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch

#: Iglewicz & Hoaglin (1993): the modified z-score's constant and recommended outlier cut-off
MODIFIED_Z_SCALE = 0.6745
MODIFIED_Z_CUTOFF = 3.5
#: PH-Reg Fig. 5 (arXiv:2505.21501): percentiles of dissimilarity at which token consistency is read
DISSIMILARITY_PERCENTILES = (50, 70, 90, 95, 99)


def patch_norms(patch: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) dense features -> (B, h*w) per-token L2 norms."""
    return patch.flatten(2).norm(dim=1)


def modified_z(norms: torch.Tensor) -> torch.Tensor:
    """Per-row modified z-scores of (B, N) values (a row with zero MAD scores 0 everywhere)."""
    x = norms.double()
    med = x.median(dim=1, keepdim=True).values
    mad = (x - med).abs().median(dim=1, keepdim=True).values
    z = MODIFIED_Z_SCALE * (x - med) / mad.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(mad > 0, z, torch.zeros_like(z))


def norm_outliers(norms: torch.Tensor, cutoff: float = MODIFIED_Z_CUTOFF) -> Dict[str, torch.Tensor]:
    """Boolean (B, N) masks of high- and low-norm outlier tokens, decided per image."""
    z = modified_z(norms)
    return {"high": z > cutoff, "low": z < -cutoff}


def outlier_share(norms: torch.Tensor, cutoff: float = MODIFIED_Z_CUTOFF) -> Dict[str, float]:
    """Share (0-1) of tokens that are high- / low-norm outliers over all images of (B, N) norms."""
    masks = norm_outliers(norms, cutoff)
    return {k: float(m.double().mean()) for k, m in masks.items()}


def norm_spread(norms: torch.Tensor) -> torch.Tensor:
    """Per-image coefficient of variation (std / mean) of the token norms: (B, N) -> (B,)."""
    x = norms.double()
    return x.std(dim=1, unbiased=False) / x.mean(dim=1).clamp_min(torch.finfo(torch.float64).tiny)


def token_cosine(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine of each token of (B, C, h, w) ``features`` to the same token of ``target``: (B, h*w)."""
    return torch.nn.functional.cosine_similarity(features.flatten(2).double(), target.flatten(2).double(), dim=1)


def dissimilarity_percentiles(cosines: Iterable[torch.Tensor],
                              percentiles: Sequence[int] = DISSIMILARITY_PERCENTILES) -> Dict[int, float]:
    """Cosine at the p-th percentile of dissimilarity, pooled over all tokens (PH-Reg Fig. 5).

    The p-th percentile of dissimilarity is the ``(100 - p)``-th percentile of the cosine: at p = 99 only
    1% of the tokens are less similar to their target than the value returned.
    """
    c = torch.cat([x.reshape(-1).double() for x in cosines])
    if c.numel() == 0:
        raise ValueError("no token cosines to summarise")
    q = torch.tensor([(100 - p) / 100 for p in percentiles], dtype=torch.float64)
    return {int(p): float(v) for p, v in zip(percentiles, torch.quantile(c, q))}


def pearson_with_onehot(scores: torch.Tensor, label: torch.Tensor, ignore_index: int = 255,
                        classes: Optional[Sequence[int]] = None) -> Optional[float]:
    """PH-Reg Table S.4's score for one image: the Pearson correlation of each class's query map with the
    one-hot ground truth of that class, averaged over the classes present in the image.

    Args:
        scores: (K, H, W) per-class query maps at label resolution (logits or cosine maps).
        label: (H, W) class indices; ``ignore_index`` pixels are left out.
        classes: the classes to average over; default: those present in ``label``. A class whose map or
            mask is constant over the valid pixels has no correlation and is skipped.
    Returns:
        The mean correlation, or None when no class could be scored.
    """
    valid = label != ignore_index
    if not bool(valid.any()):
        return None
    y = label[valid]
    s = scores[:, valid].double()  # (K, P)
    present = classes if classes is not None else [int(c) for c in torch.unique(y) if 0 <= int(c) < s.shape[0]]
    vals = []
    for c in present:
        t = (y == c).double()
        a, b = s[c] - s[c].mean(), t - t.mean()
        den = a.norm() * b.norm()
        if float(den) > 0:
            vals.append(float((a * b).sum() / den))
    return sum(vals) / len(vals) if vals else None
