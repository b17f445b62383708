"""One configurable last block that covers MaskCLIP, SCLIP, ClearCLIP and NACLIP exactly.

The four training-free CLIP surgeries differ along three axes (MaskCLIP, Zhou et al., ECCV 2022,
arXiv:2112.01071; SCLIP arXiv:2312.01597; ClearCLIP arXiv:2407.12442; NACLIP arXiv:2404.08181):
the attention kernel, whether the residual is kept and whether the FFN is kept. ``ln_post`` and
``proj`` (the backbone's ``finalize``) are applied to all tokens in every method.

Kernels, per head, with ``s = head_dim ** -0.5`` (chongzhou96/MaskCLIP@245d31f ``mmseg/models/backbones/vit.py``,
wangf3014/SCLIP@b56bd30 ``clip/model.py``, mc-lan/ClearCLIP@ad68a40 ``open_clip/transformer.py``,
sinahmr/NACLIP@0cac3a6 ``clip/model.py``):

* ``qk``        softmax(q kᵀ s)                          -- vanilla attention
* ``identity``  each token attends only to itself: v     -- MaskCLIP's value path
* ``qq+kk``     softmax(q qᵀ s) + softmax(k kᵀ s)         -- SCLIP's CSA (rows sum to 2, not renormalised)
* ``qq``        softmax(q qᵀ s)                          -- ClearCLIP
* ``kk+gauss``  softmax(k kᵀ s + Ω), Ω_ij = exp(-‖p_i - p_j‖² / (2σ²)) over patch-grid positions,
  CLS row and column 0                                    -- NACLIP (σ = 5 patches)
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone, BlockParts, TokenLayout, Tokens
from ..errors import ConfigError
from .base import Method

KERNELS = ("qk", "identity", "qq+kk", "qq", "kk+gauss")


def gaussian_neighbourhood(layout: TokenLayout, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """NACLIP's Ω: (L, L) over the layout's tokens; rows/columns of every non-patch token are 0.

    Ω_ij = exp(-d²/(2σ²)) with d the Euclidean distance between patch i and patch j on the grid,
    unnormalised (peak 1), as ``F.conv2d(one_hot, window, padding='same')`` yields in NACLIP's
    ``get_attention_addition`` (sinahmr/NACLIP clip/model.py); NACLIP's ``adjust_for_cls`` pads the CLS
    row and column with zeros, and tokens added by other methods (a test-time register) are padded the
    same way.
    """
    h, w = layout.grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float64),
                            torch.arange(w, device=device, dtype=torch.float64), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)
    d2 = torch.cdist(pos, pos).pow(2)
    omega = torch.exp(-d2 / (2.0 * sigma * sigma))
    full = torch.zeros(layout.length, layout.length, device=device, dtype=torch.float64)
    p = layout.patches
    full[p, p] = omega
    return full.to(dtype)


class LastBlockMethod(Method):
    """A method whose last block is rebuilt from ``kernel``, ``residual`` and ``ffn`` (fixed in ``CONFIG``).

    Subclasses may expose tunable parameters in ``PARAMS`` (name -> default).
    """

    CONFIG: Dict[str, Any] = {"kernel": "qk", "residual": True, "ffn": True}
    TOUCHES = ("last_block",)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)  # records keep the tunable parameters; CONFIG follows from the name
        self.kernel = str(self.CONFIG["kernel"])
        if self.kernel not in KERNELS:
            raise ConfigError(f"unknown attention kernel {self.kernel!r}; one of {', '.join(KERNELS)}")
        self.residual = bool(self.CONFIG["residual"])
        self.ffn = bool(self.CONFIG["ffn"])
        self.sigma = float(self.params.get("sigma", 5.0))
        self._omega: Dict[Tuple[TokenLayout, str, torch.dtype], torch.Tensor] = {}

    def _omega_for(self, layout: TokenLayout, like: torch.Tensor) -> torch.Tensor:
        key = (layout, str(like.device), like.dtype)
        if key not in self._omega:
            self._omega[key] = gaussian_neighbourhood(layout, self.sigma, like.device, like.dtype)
        return self._omega[key]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Per-head attention output (B, heads, L, head_dim) for the configured kernel.

        Every softmax kernel is a fused ``scaled_dot_product_attention`` call (no L x L matrix is kept):
        ``qq`` passes q as the keys, SCLIP's sum of two softmaxes times v is the sum of two calls
        ((A + B) v = A v + B v), NACLIP's Gaussian Ω is SDPA's additive float ``attn_mask``. The explicit
        formulas are :meth:`attention_reference`; tests check both agree.
        """
        if self.kernel == "identity":
            return v
        s = q.shape[-1] ** -0.5
        if self.kernel == "qk":
            return F.scaled_dot_product_attention(q, k, v, scale=s)
        if self.kernel == "qq":
            return F.scaled_dot_product_attention(q, q, v, scale=s)
        if self.kernel == "qq+kk":
            return F.scaled_dot_product_attention(q, q, v, scale=s) + F.scaled_dot_product_attention(k, k, v, scale=s)
        omega = self._omega_for(layout, k)  # kk+gauss
        return F.scaled_dot_product_attention(k, k, v, attn_mask=omega, scale=s)

    def attention_reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            layout: TokenLayout) -> torch.Tensor:
        """The kernels written out as the papers' formulas (explicit L x L attention), for checking."""
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
            a = torch.softmax(k @ k.transpose(-2, -1) * s + self._omega_for(layout, k), dim=-1)
        return a @ v

    def last_block(self, backbone: Backbone, parts: BlockParts, tokens: Tokens) -> torch.Tensor:
        x = tokens.x
        q, k, v = parts.qkv(parts.norm1(x))
        out = self.attention(q, k, v, tokens.layout)
        b, _, n, _ = out.shape
        out = parts.out_proj(out.transpose(1, 2).reshape(b, n, -1))
        x = x + parts.ls1(out) if self.residual else out
        if self.ffn:
            x = x + parts.ls2(parts.mlp(parts.norm2(x)))
        return x
