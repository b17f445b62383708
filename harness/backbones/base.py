"""The backbone half of the one dense-feature interface: a ViT as stages over laid-out tokens.

A backbone adapter (open_clip, timm, ...) exposes its ViT as stages so that a cleaning method can touch
any of them without knowing which library built the model (DEVELOPERS.md "Style"):

* :meth:`Backbone.embed` -- patch embedding, (interpolated) positional embedding and the prefix tokens,
  *before* any pre-norm. Returns :class:`Tokens`: the (B, L, D) sequence plus a :class:`TokenLayout` that
  says which positions are CLS, registers, patches and tokens added by methods, and the patch grid.
* :meth:`Backbone.pre_norm` -- CLIP's ``ln_pre`` / timm's ``norm_pre`` (identity for DINOv2).
* :meth:`Backbone.block` -- block ``i`` as :class:`BlockParts` (norms, qkv, out-projection, MLP with its
  activation module reachable for hooks, layer scales, and the library's own block to run it).
* :meth:`Backbone.final_norm` and :meth:`Backbone.project` -- the final norm and, for CLIP, ``proj``; both
  act on *all* tokens. :meth:`Backbone.finalize` is the two together. :meth:`Backbone.pool` sits between
  them: it puts the global token at the CLS position (the CLS output, or LaSt-ViT's pooled patches).

The layout travels with the tokens, so nothing slices by a backbone's register count: a method that
adds a token, a backbone without CLS or with registers are all the same code downstream.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import WeightsError
from .pooling import last_pool

#: segment kinds of a layout; tokens added by a method are ``added:<method>``
CLS, REGISTERS, PATCHES = "cls", "registers", "patches"
#: where a method may insert tokens
WHERE = ("start", "before_patches", "after_patches", "end")


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone id binds: architecture, weights and preprocessing, frozen together."""

    id: str
    family: str  # "open_clip" | "timm" | ...
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
    #: caveat shown by ``harness list backbones`` and as a leaderboard footnote (e.g. unofficial weights)
    note: str = ""
    #: global token: 0 = the CLS output; k >= 1 = LaSt pooling over the top-k patches per channel
    #: (:mod:`harness.backbones.pooling`), for backbones trained with it
    last_k: int = 0

    @property
    def mean_255(self) -> List[float]:
        return [255.0 * m for m in self.mean]

    @property
    def std_255(self) -> List[float]:
        return [255.0 * s for s in self.std]


@dataclass(frozen=True)
class TokenLayout:
    """Which positions of a token sequence are what: ordered ``(kind, count)`` segments and the patch grid.

    Kinds are ``cls``, ``registers`` (the backbone's own), ``patches`` (row-major over ``grid``) and
    ``added:<method>`` for tokens a cleaning method inserted. Patches are one contiguous segment.
    """

    segments: Tuple[Tuple[str, int], ...]
    grid: Tuple[int, int]

    @classmethod
    def standard(cls, grid: Tuple[int, int], has_cls: bool = True, num_registers: int = 0) -> "TokenLayout":
        """``[CLS, registers, patches]``: the order of open_clip and timm ViTs."""
        segs: List[Tuple[str, int]] = []
        if has_cls:
            segs.append((CLS, 1))
        if num_registers:
            segs.append((REGISTERS, int(num_registers)))
        segs.append((PATCHES, int(grid[0]) * int(grid[1])))
        return cls(tuple(segs), (int(grid[0]), int(grid[1])))

    def __post_init__(self) -> None:
        kinds = [k for k, _ in self.segments]
        if kinds.count(PATCHES) != 1:
            raise ValueError(f"a token layout needs exactly one patch segment, got {kinds}")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"duplicate segment kinds in {kinds}")
        if dict(self.segments)[PATCHES] != self.grid[0] * self.grid[1]:
            raise ValueError(f"{dict(self.segments)[PATCHES]} patch tokens do not fill the grid {self.grid}")

    @property
    def length(self) -> int:
        return sum(n for _, n in self.segments)

    def has(self, kind: str) -> bool:
        return any(k == kind for k, _ in self.segments)

    def span(self, kind: str) -> slice:
        """Positions of segment ``kind`` (an empty slice when absent)."""
        start = 0
        for k, n in self.segments:
            if k == kind:
                return slice(start, start + n)
            start += n
        return slice(0, 0)

    @property
    def patches(self) -> slice:
        return self.span(PATCHES)

    @property
    def cls_index(self) -> Optional[int]:
        return self.span(CLS).start if self.has(CLS) else None

    @property
    def added(self) -> List[str]:
        """Kinds of the tokens methods added, in sequence order."""
        return [k for k, _ in self.segments if k.startswith("added:")]

    def insert(self, kind: str, count: int, where: str) -> Tuple["TokenLayout", int]:
        """A new layout with ``count`` tokens of ``kind`` inserted, and the position they start at."""
        if where not in WHERE:
            raise ValueError(f"unknown insertion point {where!r}; one of {', '.join(WHERE)}")
        segs = list(self.segments)
        idx = {"start": 0, "end": len(segs)}.get(where)
        if idx is None:
            p = [k for k, _ in segs].index(PATCHES)
            idx = p if where == "before_patches" else p + 1
        segs.insert(idx, (kind, int(count)))
        new = replace(self, segments=tuple(segs))
        return new, new.span(kind).start


@dataclass
class Tokens:
    """A (B, L, D) token sequence and its layout; methods and stages pass these, never bare slices."""

    x: torch.Tensor
    layout: TokenLayout

    def __post_init__(self) -> None:
        if self.x.shape[1] != self.layout.length:
            raise ValueError(f"tokens have length {self.x.shape[1]}, the layout says {self.layout.length}")

    def with_x(self, x: torch.Tensor) -> "Tokens":
        return Tokens(x, self.layout)

    def part(self, kind: str) -> torch.Tensor:
        return self.x[:, self.layout.span(kind)]

    def insert(self, kind: str, new: torch.Tensor, where: str) -> "Tokens":
        """Insert ``new`` (B, n, D) tokens of ``kind`` at ``where`` (see :data:`WHERE`)."""
        layout, at = self.layout.insert(kind, new.shape[1], where)
        return Tokens(torch.cat([self.x[:, :at], new.to(self.x.dtype), self.x[:, at:]], dim=1), layout)


@dataclass
class DenseFeatures:
    """Output of the dense interface.

    Attributes:
        patch: (B, C, h, w) final patch features on the patch grid.
        cls: (B, C) class token after the same final processing (None for a backbone without CLS).
        registers: (B, R, C) the backbone's own register tokens (R = 0 when it has none). Tokens added
            by cleaning methods are never part of the dense output.
    """

    patch: torch.Tensor
    cls: Optional[torch.Tensor]
    registers: torch.Tensor

    @property
    def grid(self) -> Tuple[int, int]:
        return int(self.patch.shape[-2]), int(self.patch.shape[-1])


def split_features(tokens: Tokens) -> DenseFeatures:
    """(B, L, C) final tokens -> :class:`DenseFeatures` by their layout (added tokens dropped)."""
    x, lay = tokens.x, tokens.layout
    b, _, c = x.shape
    patch = x[:, lay.patches].transpose(1, 2).reshape(b, c, lay.grid[0], lay.grid[1])
    cls = x[:, lay.cls_index] if lay.cls_index is not None else None
    return DenseFeatures(patch=patch, cls=cls, registers=x[:, lay.span(REGISTERS)])


@dataclass
class BlockParts:
    """One transformer block, decomposed so that a method can rewire it or hook into it.

    ``qkv(y)`` maps normalised tokens (B, L, D) to q, k, v, each (B, heads, L, head_dim), bias included.
    ``out_proj`` maps (B, L, D) back to the residual width. ``ls1``/``ls2`` are the layer scales
    (identity for CLIP). ``mlp_act`` is the MLP's non-linearity module: its output is the hidden units
    (a forward hook there sees and edits them). ``run`` applies the library's own block to batch-first
    tokens, so an untouched block computes exactly what the library computes.
    """

    norm1: nn.Module
    qkv: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    out_proj: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    mlp_act: nn.Module
    mlp_hidden: int
    num_heads: int
    run: Callable[[torch.Tensor], torch.Tensor]
    ls1: nn.Module = field(default_factory=nn.Identity)
    ls2: nn.Module = field(default_factory=nn.Identity)


class Backbone(nn.Module):
    """A pretrained ViT adapter. Subclasses fill in the stages described in the module doc."""

    spec: BackboneSpec
    weights_id: str  # sha256 of the weights file, or "random-init"
    #: why the text tower is missing although the spec has one (a vision-only weights file), else None
    text_missing: Optional[str] = None

    @property
    def num_blocks(self) -> int:
        raise NotImplementedError

    @property
    def width(self) -> int:
        """Residual width D."""
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> Tokens:
        """Normalised images (B, 3, H, W) -> tokens before the pre-norm, with their layout."""
        raise NotImplementedError

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def block(self, i: int) -> BlockParts:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, tokens: Tokens) -> Tokens:
        """The global token, put at the CLS position of the final-normed tokens (before ``proj``).

        The CLS output as is, unless the spec sets ``last_k``: then the LaSt pooling of the patch tokens
        (:func:`harness.backbones.pooling.last_pool`), the global token those backbones were trained with.
        """
        k, i = int(self.spec.last_k), tokens.layout.cls_index
        if not k or i is None:
            return tokens
        x = tokens.x.clone()
        x[:, i] = last_pool(tokens.x[:, tokens.layout.patches], k)
        return tokens.with_x(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP's ``proj`` into the joint space; identity for vision-only backbones."""
        return x

    def finalize(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm (+ projection for CLIP) applied to all tokens (B, L, D) -> (B, L, C)."""
        return self.project(self.final_norm(x))

    def check_text(self) -> None:
        """Raise :class:`WeightsError` when the spec promises a text tower that the weights file lacked."""
        if self.text_missing:
            raise WeightsError(self.text_missing)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text tower for CLIP ids: token ids (N, 77) -> embeddings (N, C), not normalised."""
        raise TypeError(f"backbone {self.spec.id!r} has no text tower")

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        raise TypeError(f"backbone {self.spec.id!r} has no text tower")

    def block_index(self, layer: int) -> int:
        """A 0-based block index from ``layer`` (negative counts from the end), checked against the depth."""
        n = self.num_blocks
        i = layer + n if layer < 0 else layer
        if not 0 <= i < n:
            raise IndexError(f"layer {layer} is out of range for backbone {self.spec.id!r} with {n} blocks "
                             f"(0..{n - 1}, or -{n}..-1)")
        return i


class EmbedOverride(Backbone):
    """The stages of a ``base`` adapter behind a different :meth:`embed` (added tokens, another positional rule).

    Blocks, norms and projection are the base's; a subclass overrides :meth:`embed` only. PH-Reg's students
    and UniRefiner's ring-padded tower are built this way on a copy of the backbone's vision adapter.
    """

    def __init__(self, base: Backbone) -> None:
        super().__init__()
        self.base = base
        self.spec = base.spec
        self.weights_id = base.weights_id

    @property
    def num_blocks(self) -> int:
        return self.base.num_blocks

    @property
    def width(self) -> int:
        return self.base.width

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.pre_norm(x)

    def block(self, i: int) -> BlockParts:
        return self.base.block(i)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.final_norm(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.project(x)


def check_patch_multiple(images: torch.Tensor, patch: int) -> None:
    """Raise for an input whose size is not a multiple of the patch size (timm's patch embedding would crop
    or fail; the probes centre-pad first, as DVT does)."""
    if images.shape[-2] % patch or images.shape[-1] % patch:
        raise ValueError(f"input {tuple(images.shape[-2:])} is not a multiple of the patch size {patch}; "
                         f"pad it first (harness.probes.features.center_pad, as DVT does)")


def attention_qkv_heads(weight: torch.Tensor, bias: Optional[torch.Tensor], heads: int
                        ) -> Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``qkv`` of :class:`BlockParts` for a fused (3D, D) in-projection (open_clip and timm both use one)."""

    def qkv(y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = y.shape
        out = nn.functional.linear(y, weight, bias)
        q, k, v = out.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    return qkv

