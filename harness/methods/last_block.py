"""One configurable last block that covers MaskCLIP, SCLIP, ClearCLIP and NACLIP exactly.

The four training-free CLIP surgeries differ along three axes (ovss.md §1.1 and "Key takeaways" 3):
the attention kernel, whether the residual is kept and whether the FFN is kept. ``ln_post`` and
``proj`` (the backbone's ``finalize``) are applied to all tokens in every method.

Kernels, per head, with ``s = head_dim ** -0.5`` (ovss.md §1.1):

* ``qk``        softmax(q kᵀ s)                          -- vanilla attention
* ``identity``  each token attends only to itself: v     -- MaskCLIP's value path
* ``qq+kk``     softmax(q qᵀ s) + softmax(k kᵀ s)         -- SCLIP's CSA (rows sum to 2, not renormalised)
* ``qq``        softmax(q qᵀ s)                          -- ClearCLIP
* ``kk+gauss``  softmax(k kᵀ s + Ω), Ω_ij = exp(-‖p_i - p_j‖² / (2σ²)) over patch-grid positions,
  CLS row and column 0                                    -- NACLIP (σ = 5 patches)
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..backbones.base import Backbone, DenseModel
from ..errors import ConfigError

KERNELS = ("qk", "identity", "qq+kk", "qq", "kk+gauss")


def gaussian_neighbourhood(grid: Tuple[int, int], sigma: float, num_prefix: int, device: torch.device,
                           dtype: torch.dtype) -> torch.Tensor:
    """NACLIP's Ω: (L, L) with L = num_prefix + h*w; prefix rows/columns are 0 (NACLIP adjust_for_cls).

    Ω_ij = exp(-d²/(2σ²)) with d the Euclidean distance between patch i and patch j on the grid,
    unnormalised (peak 1), as ``F.conv2d(one_hot, window, padding='same')`` yields in NACLIP's
    ``get_attention_addition`` (sinahmr/NACLIP clip/model.py).
    """
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float64),
                            torch.arange(w, device=device, dtype=torch.float64), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)
    d2 = torch.cdist(pos, pos).pow(2)
    omega = torch.exp(-d2 / (2.0 * sigma * sigma))
    full = torch.zeros(num_prefix + h * w, num_prefix + h * w, device=device, dtype=torch.float64)
    full[num_prefix:, num_prefix:] = omega
    return full.to(dtype)


class LastBlockMethod(DenseModel):
    """A DenseModel whose last block is rebuilt from ``kernel``, ``residual`` and ``ffn``.

    Subclasses fix these three in ``CONFIG`` and may expose tunable parameters in ``PARAMS``
    (name -> default). Unknown parameter names are an error that lists the valid ones.
    """

    CONFIG: Dict[str, object] = {"kernel": "qk", "residual": True, "ffn": True}
    PARAMS: Dict[str, object] = {}

    def __init__(self, backbone: Backbone, **params: object) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        name = getattr(type(self), "registry_name", type(self).__name__)
        if unknown:
            valid = ", ".join(sorted(self.PARAMS)) or "none"
            raise ConfigError(f"method {name!r} has no parameter(s) {', '.join(unknown)}; valid: {valid}")
        merged = {**self.PARAMS, **params}
        super().__init__(backbone, **merged)  # records keep the tunable parameters; CONFIG follows from the name
        self.kernel = str(self.CONFIG["kernel"])
        if self.kernel not in KERNELS:
            raise ConfigError(f"unknown attention kernel {self.kernel!r}; one of {', '.join(KERNELS)}")
        self.residual = bool(self.CONFIG["residual"])
        self.ffn = bool(self.CONFIG["ffn"])
        self.sigma = float(merged.get("sigma", 5.0))
        self._omega: Dict[Tuple[int, int, str, torch.dtype], torch.Tensor] = {}

    def _omega_for(self, grid: Tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        key = (grid[0], grid[1], str(like.device), like.dtype)
        if key not in self._omega:
            self._omega[key] = gaussian_neighbourhood(grid, self.sigma, self.backbone.num_prefix_tokens,
                                                      like.device, like.dtype)
        return self._omega[key]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Per-head attention output (B, heads, L, head_dim) for the configured kernel."""
        if self.kernel == "identity":
            return v
        s = q.shape[-1] ** -0.5
        if self.kernel == "qk":
            a = torch.softmax(q @ k.transpose(-2, -1) * s, dim=-1)
        elif self.kernel == "qq":
            a = torch.softmax(q @ q.transpose(-2, -1) * s, dim=-1)
        elif self.kernel == "qq+kk":
            a = torch.softmax(q @ q.transpose(-2, -1) * s, dim=-1) + torch.softmax(k @ k.transpose(-2, -1) * s, dim=-1)
        else:  # kk+gauss
            a = torch.softmax(k @ k.transpose(-2, -1) * s + self._omega_for(grid, k), dim=-1)
        return a @ v

    def forward_last(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        p = self.backbone.last_block_parts()
        q, k, v = p.qkv(p.norm1(tokens))
        out = self.attention(q, k, v, grid)
        b, _, n, _ = out.shape
        out = p.out_proj(out.transpose(1, 2).reshape(b, n, -1))
        x = tokens + p.ls1(out) if self.residual else out
        if self.ffn:
            x = x + p.ls2(p.mlp(p.norm2(x)))
        return x
