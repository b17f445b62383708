"""DVT's generalizable denoiser (Yang et al., "Denoising Vision Transformers", ECCV 2024, arXiv:2401.02957, §3.3).

One pre-norm transformer block (timm ``Block``: width C, C/64 heads, MLP ratio 4, qkv bias, LayerNorm eps
1e-6, GELU, no layer scale) and a learnable additive positional embedding of the training grid (37 x 37 for
patch 14 at 518 px, 32 x 32 for patch 16 at 512 px). It maps the backbone's *final-normed* patch tokens to
denoised ones: the positional embedding, bicubically resampled (with antialias) to the feature grid, is
added, then the block runs over the patch tokens only; the CLS token and any registers pass untouched.
For CLIP the map acts before ``proj`` (our ``post_norm`` touch; the readout then applies ``proj``), as DVT
applies it to timm's ``forward_intermediates(norm=True)`` output, which stops before the head.

This re-implements ``Denoiser`` of github.com/Jiawei-Yang/Denoising-ViT @ 82704df
(``dvt/models/online_denoiser.py``; loading: ``evaluate_dense_tasks.py``, application:
``evaluation/eval_utils/misc.py::build_segmentor``). The weights file is theirs:

* ``{"denoiser": {"denoiser.<timm Block keys>": ..., "pos_embed": (1, N, C)}, ...}`` as written by their
  ``main_denoiser.py`` and released on Hugging Face (``jjiaweiyang/DVT``, ``voc_denoised/<timm name>.pth``,
  ``imgnet_denoised/vit_base_patch14_dinov2.lvd142m.pth``); ``--num_blocks K > 1`` gives
  ``denoiser.<i>.<Block keys>``. Other top-level keys (``optimizer``, ``step``) are ignored.
* files written by ``harness distill dvt`` add ``"harness": {"backbone": ID, "num_heads": H, ...}``; the
  backbone id is checked against the one it is applied to.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only.
"""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone, Tokens
from ..errors import WeightsError
from ..registry import METHODS
from .base import Method

#: Denoiser: ``num_heads=feat_dim // 64`` (online_denoiser.py @ 82704df)
HEAD_DIM = 64
#: Denoiser: ``mlp_ratio=4`` (online_denoiser.py @ 82704df)
MLP_RATIO = 4.0
#: Denoiser: ``norm_layer=partial(nn.LayerNorm, eps=1e-6)`` (online_denoiser.py @ 82704df)
LN_EPS = 1e-6
#: Denoiser: ``pos_embed = randn(1, h*w, C) * 0.02`` (online_denoiser.py @ 82704df)
POS_EMBED_INIT_STD = 0.02
#: the positional-embedding grid per patch size: evaluate_dense_tasks.py @ 82704df sets ``pos_h = 37`` for
#: stride 14 and ``32`` for stride 16 (= (518 - 14) // 14 + 1 and (512 - 16) // 16 + 1 in main_denoiser.py)
POS_GRID = {14: 37, 16: 32}
FILE_FORMAT = ('a DVT denoiser checkpoint: a dict with "denoiser": {"denoiser.<timm Block keys>": tensor, ..., '
               '"pos_embed": (1, N, C) tensor} (Denoising-ViT main_denoiser.py / HF jjiaweiyang/DVT '
               'voc_denoised/*.pth, or the output of `harness distill dvt`)')
#: the keys of one timm ``Block`` as DVT builds it (no layer scale, no qk-norm)
BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
              "mlp.fc2.bias")


def resample_pos_embed(pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(1, N, C) square-grid embedding -> (1, h*w, C): bicubic with antialias, ``align_corners=False``.

    What DVT calls (``timm.layers.resample_abs_pos_embed(pos, (h, w), num_prefix_tokens=0)``, timm 1.0
    ``layers/pos_embed.py``): unchanged on the stored square grid, otherwise interpolated in float32.
    """
    n, c = int(pos.shape[1]), int(pos.shape[2])
    m = math.isqrt(n)
    h, w = int(grid[0]), int(grid[1])
    if h * w == n and h == w:
        return pos
    src = pos.float().reshape(1, m, m, c).permute(0, 3, 1, 2)
    out = F.interpolate(src, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(1, h * w, c).to(pos.dtype)


def make_block(width: int, num_heads: int) -> nn.Module:
    """One timm ``Block`` configured exactly as DVT's ``Denoiser`` builds it (online_denoiser.py @ 82704df)."""
    from timm.models.vision_transformer import Block, Mlp

    return Block(dim=width, num_heads=num_heads, mlp_ratio=MLP_RATIO, qkv_bias=True, qk_norm=False, init_values=None,
                 norm_layer=partial(nn.LayerNorm, eps=LN_EPS), act_layer=nn.GELU, mlp_layer=Mlp)


def default_heads(width: int) -> int:
    """DVT's head count C // 64, at least 1 (our tiny test backbones are narrower than 64)."""
    return max(1, int(width) // HEAD_DIM)


class DenoiserNet(nn.Module):
    """The denoiser itself: ``pos_embed`` + ``denoiser`` (one Block, or a Sequential of K), DVT's key names."""

    def __init__(self, width: int, pos_grid: int, num_heads: Optional[int] = None, num_blocks: int = 1) -> None:
        super().__init__()
        heads = num_heads or default_heads(width)
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.width, self.num_heads = int(width), int(heads)
        self.num_blocks, self.pos_grid = int(num_blocks), int(pos_grid)
        if num_blocks == 1:
            self.denoiser: nn.Module = make_block(width, heads)
        else:
            self.denoiser = nn.Sequential(*[make_block(width, heads) for _ in range(num_blocks)])
        self.pos_embed = nn.Parameter(torch.randn(1, pos_grid * pos_grid, width) * POS_EMBED_INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) final-normed patch features -> (B, h, w, C) denoised (Denoiser.forward with vit=None)."""
        b, h, w, c = x.shape
        t = x.reshape(b, h * w, c) + resample_pos_embed(self.pos_embed, (h, w)).to(x.dtype)
        return self.denoiser(t).reshape(b, h, w, c)


def _fail(path: str, what: str) -> WeightsError:
    return WeightsError(f"--method-weights {path}: {what}")


def read_denoiser_file(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The ``denoiser`` state dict and our metadata (empty for the authors' files); clear errors otherwise."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled objects beyond tensors
        raise _fail(path, f"cannot read it as a tensor-only PyTorch checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''}); expected {FILE_FORMAT}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("denoiser"), dict):
        if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
            raise _fail(path, "this is a full ViT checkpoint (key 'model', e.g. DVT's voc_distilled/*.pth), not a "
                              "denoiser; load a distilled ViT as backbone weights with --weights FILE")
        keys = sorted(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise _fail(path, f"no 'denoiser' entry (found {keys}); expected {FILE_FORMAT}")
    state = ckpt["denoiser"]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise _fail(path, f"'denoiser' entries {bad[:3]} are not tensors; expected {FILE_FORMAT}")
    meta = ckpt.get("harness") if isinstance(ckpt.get("harness"), dict) else {}
    return state, meta


def _layout(path: str, state: Dict[str, torch.Tensor]) -> Tuple[int, int, int]:
    """(width, positional grid side, number of blocks) from the key names and shapes."""
    pos = state.get("pos_embed")
    if pos is None or pos.dim() != 3 or pos.shape[0] != 1:
        raise _fail(path, f"'denoiser' has no pos_embed of shape (1, N, C) (got "
                          f"{None if pos is None else tuple(pos.shape)}); expected {FILE_FORMAT}")
    n, width = int(pos.shape[1]), int(pos.shape[2])
    side = math.isqrt(n)
    if side * side != n:
        raise _fail(path, f"pos_embed has {n} positions, not a square grid (DVT stores 37x37 or 32x32)")
    others = [k for k in state if k != "pos_embed"]
    if all(k[len("denoiser."):] in BLOCK_KEYS for k in others if k.startswith("denoiser.")) and \
            "denoiser.norm1.weight" in state:
        blocks = 1
    else:
        idx = sorted({int(k.split(".")[1]) for k in others if k.startswith("denoiser.") and k.split(".")[1].isdigit()})
        if not idx or idx != list(range(len(idx))):
            raise _fail(path, f"'denoiser' keys {others[:3]} are not one timm Block ('denoiser.norm1.weight', ...) "
                              f"or a sequence of them ('denoiser.0.norm1.weight', ...); expected {FILE_FORMAT}")
        blocks = len(idx)
    return width, side, blocks


def load_denoiser(path: str, backbone: Backbone) -> DenoiserNet:
    """Build the denoiser of ``path`` for ``backbone`` (width and, for our files, backbone id checked)."""
    state, meta = read_denoiser_file(path)
    width, side, blocks = _layout(path, state)
    if meta.get("backbone") not in (None, backbone.spec.id):
        raise _fail(path, f"this denoiser was trained on backbone {meta['backbone']!r}, not {backbone.spec.id!r}; "
                          f"train one with `harness distill dvt --backbone {backbone.spec.id} ...`")
    if width != backbone.width:
        raise _fail(path, f"the denoiser has width {width}, but the final-norm features of backbone "
                          f"{backbone.spec.id!r} have width {backbone.width}: it was trained for another model")
    heads = int(meta.get("num_heads") or default_heads(width))
    try:
        net = DenoiserNet(width, side, heads, blocks)
        net.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as e:
        raise _fail(path, f"does not fit a {blocks}-block DVT denoiser of width {width} "
                          f"({str(e).splitlines()[0][:200]}); expected {FILE_FORMAT}") from e
    return net.eval()


@METHODS.register("dvt")
class DVTDenoiser(Method):
    """DVT's generalizable denoiser (Yang et al., ECCV 2024): one block + positional embedding after the final norm."""

    TOUCHES = ("post_norm",)
    WEIGHTS = "required"
    WEIGHTS_HELP = ("a DVT denoiser checkpoint: the authors' voc_denoised/<timm name>.pth (Hugging Face "
                    "jjiaweiyang/DVT) for the timm backbones, or train one with `harness distill dvt --backbone ID "
                    "--images DIR --out FILE`")
    # online_denoiser.py @ 82704df: one pre-norm timm Block on the patch tokens, CLS passed through
    CONFIG = {"blocks": "from the file (DVT: 1)", "heads": "width // 64", "pos_embed": "bicubic+antialias resample",
              "applies_to": "final-normed patch tokens, before proj"}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.net: Optional[DenoiserNet] = None

    def bind(self, backbone: Backbone, weights_path: Optional[str]) -> Optional[str]:
        path = self.require_weights(backbone, weights_path)
        if not os.path.isfile(path):
            raise _fail(path, "no such file")
        self.net = load_denoiser(path, backbone)
        return path

    def post_norm(self, backbone: Backbone, tokens: Tokens) -> Tokens:
        if self.net is None:
            raise WeightsError("method 'dvt' was used before its weights were bound (--method-weights)")
        lay = tokens.layout
        x = tokens.x
        b, _, c = x.shape
        h, w = lay.grid
        p = lay.patches
        dtype = self.net.pos_embed.dtype
        den = self.net(x[:, p].reshape(b, h, w, c).to(dtype)).reshape(b, h * w, c).to(x.dtype)
        return tokens.with_x(torch.cat([x[:, :p.start], den, x[:, p.stop:]], dim=1))


__all__: List[str] = ["DVTDenoiser", "DenoiserNet", "POS_GRID", "load_denoiser", "make_block", "read_denoiser_file",
                      "resample_pos_embed"]
