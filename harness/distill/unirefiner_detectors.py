"""UniRefiner's spurious-token detectors on L2-normalised teacher tokens (arXiv:2605.19622;
``unirefiner/spurious_filtering/*.py`` of github.com/CongpeiQiu/UniRefiner @ 38f4e71b). Every detector returns
a *clean* mask (True = keep the token as a supervision target).

* fixed-pattern / global-proxy (FP-GP), inter-image: a crop token's best cosine with the tokens of a fixed
  reference image; intra-image: with the reference strip pasted beside the crop. Rejected at
  ``score >= mean + sigma * std`` over the crop's tokens (sigma ``fp_gp_thres`` 0.5 in every recipe), or, in
  the code's other mode (``cosine_threshold`` of ``filter_by_fp_gp_similarity``; no released recipe uses it),
  at ``score >= c`` for a fixed cosine ``c``. The z-score rule always rejects about a third of a crop's
  tokens, however few artifacts it holds: a recall-first filter of training targets.
* adaptive register: the best cosine of the (snapped) target with a random third of the student's ring
  tokens; rejected at ``>= 0.55`` (``adaptive_register_thres`` in every recipe).
* attention hijacking (AH): over the chosen teacher layers, softmax of normalised q k^T among the crop's
  tokens (keys of tokens already rejected zeroed), averaged over layers; a token receiving little attention,
  ``1 - sum_i A_ij > mean + 0.5 std`` (statistics over tokens not yet rejected), is a hijackee.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

#: z-score factor of FP-GP (``fp_gp_thres: 0.5``, configs/*.yaml)
FP_GP_SIGMA = 0.5
#: cosine threshold of the adaptive register detector (``adaptive_register_thres: 0.55``, configs/*.yaml)
ADAPTIVE_THRESHOLD = 0.55
#: z-score factor of AH (``attention_hijack_thres: 0.5`` in every recipe that uses AH, configs/*.yaml)
AH_SIGMA = 0.5
#: spurious targets for the ring are drawn from the top 40% of FP-GP scores (``FP_GP_SAMPLE_RATIO``)
SAMPLE_TOP = 0.4
#: the adaptive detector uses a third of the ring tokens (``max(R // 3, 1)``, UniRefinerMethod.forward)
ADAPTIVE_SHARE = 3


def fp_gp(fg: torch.Tensor, reference: torch.Tensor, sigma: float = FP_GP_SIGMA,
          cosine: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P, N, D) crop tokens, (1 or P, M, D) comparison tokens -> (clean (P, N), score (P, N)).

    ``cosine`` replaces the z-score rule by a fixed threshold (the authors' ``cosine_threshold`` mode).
    """
    score = (fg @ reference.expand(fg.shape[0], -1, -1).transpose(1, 2)).max(-1).values
    if cosine is not None:
        return score < cosine, score
    thr = score.mean(-1, keepdim=True) + sigma * score.std(-1, keepdim=True)
    return score < thr, score


def sample_spurious(tokens: torch.Tensor, score: torch.Tensor, count: int, generator: Optional[torch.Generator] = None,
                    top: float = SAMPLE_TOP) -> torch.Tensor:
    """``count`` tokens per row drawn with replacement, uniformly among the top ``top`` share of ``score``."""
    n = score.shape[1]
    k = max(int(n * top), 1)
    cut = score.topk(k, dim=1).values[:, -1:]
    weights = (score >= cut).float()
    if generator is not None:  # draw where the generator lives (a CPU generator for CUDA tokens)
        weights = weights.to(generator.device)
    ids = torch.multinomial(weights, count, replacement=True, generator=generator).to(tokens.device)
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def adaptive_register(ring_sample: torch.Tensor, targets: torch.Tensor,
                      threshold: float = ADAPTIVE_THRESHOLD) -> torch.Tensor:
    """(P, K, D) ring tokens, (P, N, D) targets -> clean (P, N): not already absorbed by the ring."""
    return (targets @ ring_sample.transpose(1, 2)).max(-1).values < threshold


def hijackee_score(qk: Sequence[Tuple[torch.Tensor, torch.Tensor]], rejected: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """``1 - sum_i mean_l softmax(q_l k_l^T)_ij`` over (q, k) pairs (P, N, C) of the chosen layers -> (P, N)."""
    maps = []
    for q, k in qk:
        q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
        if rejected is not None:
            k = k.masked_fill(rejected.unsqueeze(-1), 0.0)
        maps.append(F.softmax(q @ k.transpose(1, 2), dim=-1))
    return 1.0 - torch.stack(maps).mean(0).sum(1)


def attention_hijack(qk: Sequence[Tuple[torch.Tensor, torch.Tensor]], rejected: Optional[torch.Tensor] = None,
                     sigma: float = AH_SIGMA) -> torch.Tensor:
    """Clean (P, N): tokens whose hijackee score is at most mean + sigma std (over tokens not yet rejected)."""
    score = hijackee_score(qk, rejected)
    valid = score[~rejected] if rejected is not None and bool((~rejected).any()) else score.flatten()
    return score <= valid.mean() + sigma * valid.std()


@dataclass
class Detection:
    """The detectors' clean masks (P, N) and the ring's spurious targets (P, 2R, D) before snapping."""

    inter: torch.Tensor
    intra: torch.Tensor
    adaptive: torch.Tensor
    hijack: torch.Tensor
    spurious: torch.Tensor

    @property
    def clean(self) -> torch.Tensor:
        return self.inter & self.intra & self.adaptive & self.hijack

    def masks(self) -> Dict[str, torch.Tensor]:
        return {"fp_gp_inter": self.inter, "fp_gp_intra": self.intra, "adaptive": self.adaptive,
                "attention_hijack": self.hijack}


@torch.no_grad()
def detect(fg: torch.Tensor, strip: torch.Tensor, reference: torch.Tensor, snapped: torch.Tensor,
           ring: torch.Tensor, qk: Sequence[Tuple[torch.Tensor, torch.Tensor]], generator: Optional[torch.Generator],
           fp_gp_sigma: float = FP_GP_SIGMA, adaptive_threshold: float = ADAPTIVE_THRESHOLD,
           ah_sigma: float = AH_SIGMA, fp_gp_cosine: Optional[float] = None) -> Detection:
    """All four detectors in the authors' order (AH last, seeing what the others rejected).

    ``fg`` crop tokens of the composite (P, N, D), ``strip`` its reference-strip tokens, ``reference`` the
    reference image's tokens (1, M, D), ``snapped`` the snapped targets, ``ring`` the student's ring tokens
    (P, R, D), ``qk`` the teacher's (q, k) crop-token projections per AH layer (empty: AH off).
    """
    count = ring.shape[1]
    inter, s_inter = fp_gp(fg, reference, fp_gp_sigma, fp_gp_cosine)
    intra, s_intra = fp_gp(fg, strip, fp_gp_sigma, fp_gp_cosine)
    spurious = torch.cat([sample_spurious(fg, s_inter, count, generator),
                          sample_spurious(fg, s_intra, count, generator)], dim=1)
    pick = torch.randperm(count, generator=generator)[:max(count // ADAPTIVE_SHARE, 1)].to(ring.device)
    adaptive = adaptive_register(ring[:, pick], snapped, adaptive_threshold)
    pre = inter & intra & adaptive
    hijack = attention_hijack(qk, ~pre, ah_sigma) if qk else torch.ones_like(pre)
    return Detection(inter, intra, adaptive, hijack, spurious)
