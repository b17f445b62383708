"""The one dense-feature interface that every backbone and every cleaning method satisfies.

Evaluators only ever call :meth:`DenseModel.forward_dense` (and ``encode_text`` for CLIP ids).
A backbone adapter splits its ViT into three parts so that a method can replace the last block
without knowing which library built the model:

* :meth:`Backbone.tokens_before_last_block` -- patch embedding, (interpolated) positional
  embedding, prefix tokens and every block but the last;
* :meth:`Backbone.last_block_parts` -- the last block's pieces (norms, qkv, out-projection, MLP,
  layer scales), see :class:`LastBlockParts`;
* :meth:`Backbone.finalize` -- the final norm (and, for CLIP, ``proj``) applied to *all* tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone id binds: architecture, weights and preprocessing, frozen together."""

    id: str
    family: str  # "open_clip" | "timm"
    arch: str  # library model name, e.g. "ViT-B-16-quickgelu" or "vit_base_patch14_dinov2"
    weights_tag: str  # open_clip pretrained tag or timm pretrained tag
    patch_size: int
    mean: Tuple[float, float, float]  # RGB, 0-1 scale
    std: Tuple[float, float, float]
    native_size: int
    num_registers: int = 0
    hf_hub: str = ""  # "org/repo/filename" (open_clip) or "org/repo" (timm), the weights' home
    url: str = ""  # direct download URL, if the library also knows one
    has_text: bool = False
    description: str = ""
    paper: str = ""

    @property
    def mean_255(self) -> List[float]:
        return [255.0 * m for m in self.mean]

    @property
    def std_255(self) -> List[float]:
        return [255.0 * s for s in self.std]


@dataclass
class DenseFeatures:
    """Output of the dense interface.

    Attributes:
        patch: (B, C, h, w) final patch features on the patch grid.
        cls: (B, C) class token after the same final processing.
        registers: (B, R, C) register tokens (R = 0 when the model has none).
    """

    patch: torch.Tensor
    cls: torch.Tensor
    registers: torch.Tensor

    @property
    def grid(self) -> Tuple[int, int]:
        return int(self.patch.shape[-2]), int(self.patch.shape[-1])


@dataclass
class LastBlockParts:
    """The last transformer block, decomposed so that a method can rewire it.

    ``qkv(y)`` maps the normalised tokens (B, L, D) to q, k, v, each (B, heads, L, head_dim),
    bias included. ``out_proj`` maps (B, L, D) back to the residual width. ``ls1``/``ls2`` are the
    layer scales (identity for CLIP).
    """

    norm1: nn.Module
    qkv: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    out_proj: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    num_heads: int
    ls1: nn.Module = field(default_factory=nn.Identity)
    ls2: nn.Module = field(default_factory=nn.Identity)


class Backbone(nn.Module):
    """A pretrained ViT adapter. Subclasses fill in the three parts described in the module doc."""

    spec: BackboneSpec
    weights_id: str  # sha256 of the weights file, or "random-init"

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.spec.num_registers

    def tokens_before_last_block(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Run everything before the last block. Returns tokens (B, L, D) and the patch grid (h, w)."""
        raise NotImplementedError

    def last_block_parts(self) -> LastBlockParts:
        raise NotImplementedError

    def last_block(self) -> nn.Module:
        """The unmodified last block, for the vanilla forward."""
        raise NotImplementedError

    def finalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm (+ projection for CLIP) applied to all tokens (B, L, D) -> (B, L, C)."""
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text tower for CLIP ids: token ids (N, 77) -> embeddings (N, C), not normalised."""
        raise TypeError(f"backbone {self.spec.id!r} has no text tower")

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        raise TypeError(f"backbone {self.spec.id!r} has no text tower")

    def split_tokens(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> DenseFeatures:
        """(B, L, C) final tokens -> :class:`DenseFeatures` (CLS first, then registers, then patches)."""
        b, _, c = tokens.shape
        r = self.spec.num_registers
        patch = tokens[:, 1 + r:, :].transpose(1, 2).reshape(b, c, grid[0], grid[1])
        return DenseFeatures(patch=patch, cls=tokens[:, 0], registers=tokens[:, 1:1 + r])


class DenseModel(nn.Module):
    """A backbone with a (possibly identity) cleaning method: the object evaluators receive.

    Methods subclass this (see ``harness/methods``) and override :meth:`forward_last`.
    """

    #: parameters that change the numbers, recorded in every result
    params: Dict[str, object]

    def __init__(self, backbone: Backbone, **params: object) -> None:
        super().__init__()
        self.backbone = backbone
        self.params = dict(params)

    @property
    def spec(self) -> BackboneSpec:
        return self.backbone.spec

    def forward_last(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Apply the (modified) last block to (B, L, D) tokens. Default: the vanilla block."""
        return self.backbone.last_block()(tokens)

    def forward_dense(self, x: torch.Tensor) -> DenseFeatures:
        """Images (B, 3, H, W), normalised, H and W multiples of the patch size -> dense features."""
        tokens, grid = self.backbone.tokens_before_last_block(x)
        tokens = self.forward_last(tokens, grid)
        return self.backbone.split_tokens(self.backbone.finalize(tokens), grid)

    def forward(self, x: torch.Tensor) -> DenseFeatures:  # nn.Module convention
        return self.forward_dense(x)

    def describe(self) -> Dict[str, object]:
        """Method name, tunable parameters and (for last-block methods) the fixed block configuration."""
        return {"method": getattr(type(self), "registry_name", type(self).__name__), "params": dict(self.params),
                "config": dict(getattr(self, "CONFIG", {}))}

