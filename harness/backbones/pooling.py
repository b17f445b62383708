"""LaSt pooling: the global token of LaSt-ViT backbones, built per channel from the most "stable" patches.

Shi, Yu, Yang, "Vision Transformers Need More Than Registers" (CVPR 2026, arXiv:2602.22394), README and
``cls_pretrain/conf.py::dense_vit.forward`` of github.com/ChengShiest/LAST-ViT @ cdeb884a. The CLS output is
not used; from the final-normed patch tokens X (N x C):

1. low-pass each token along the *channel* axis: FFT over C, ``fftshift``, multiply by a Gaussian of
   sigma = sqrt(C) normalised to a maximum of 1, ``ifftshift``, inverse FFT, real part -> X~;
2. frequency-stability score D = X / |X~ - X| (elementwise, signed);
3. per channel c, the k patches with the largest D[:, c]; the global token's channel c is the mean of X over
   them (k = 1 in the released models; the authors also report k = 7, cls_pretrain/README.md).

The backbones were trained with this token as their global output (classifier, CLIP projection or DINO
head), so the harness's ``DenseFeatures.cls`` of a LaSt-ViT id is this token, not the CLS output.
"""
from __future__ import annotations

import torch

#: k of the released checkpoints: ``torch.topk(diff, k=1, dim=1)`` in cls_pretrain/conf.py @ cdeb884a
DEFAULT_K = 1


def channel_gaussian(channels: int) -> torch.Tensor:
    """The authors' Gaussian over the fftshift-ed channel spectrum: ``exp(-(t / sigma)^2 / 2)`` for
    ``t = -C//2 + 1 .. C//2`` (``torch.arange(-kernel_size // 2 + 1, kernel_size // 2 + 1)``), sigma = sqrt(C)
    (``gaussian_kernel_1d(768, 768 ** 0.5)`` in cls_pretrain/conf.py @ cdeb884a), divided by its maximum.

    For even C the shifted spectrum's zero frequency sits at position C/2, where t = 1: the peak is one bin
    off the DC term. That is the authors' kernel, and their weights were trained with it, so it is kept.
    """
    t = torch.arange(-channels // 2 + 1, channels // 2 + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / channels ** 0.5) ** 2)
    return g / g.max()


def stability_score(x: torch.Tensor) -> torch.Tensor:
    """D = X / |lowpass_c(X) - X| for tokens ``x`` (..., N, C); computed in float64 (the FFT of 768 channels
    in half precision would move which patch wins)."""
    x64 = x.to(torch.float64)
    g = channel_gaussian(x.shape[-1]).to(x.device)
    spec = torch.fft.fftshift(torch.fft.fft(x64, dim=-1), dim=-1) * g
    smooth = torch.fft.ifft(torch.fft.ifftshift(spec, dim=-1), dim=-1).real
    return x64 / (smooth - x64).abs()


def last_pool(patches: torch.Tensor, k: int = DEFAULT_K) -> torch.Tensor:
    """The LaSt global token of ``patches`` (B, N, C): per channel, the mean of the ``k`` patches with the
    largest stability score (module doc). Returns (B, C) in the dtype of ``patches``."""
    if patches.dim() != 3:
        raise ValueError(f"last_pool expects patch tokens (B, N, C), got shape {tuple(patches.shape)}")
    n = patches.shape[1]
    if not 1 <= int(k) <= n:
        raise ValueError(f"LaSt pooling k={k} must be between 1 and the number of patches ({n})")
    idx = torch.topk(stability_score(patches), k=int(k), dim=1, largest=True).indices  # (B, k, C)
    return torch.gather(patches, 1, idx).mean(dim=1)
