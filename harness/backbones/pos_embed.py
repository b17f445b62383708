"""Positional-embedding interpolation to any patch grid (bicubic, DINO/SCLIP style)."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

#: DINO's +0.1 offset on the target grid, kept by SCLIP/NACLIP's ``interpolate_pos_encoding``
#: (facebookresearch/dino issue #8; SCLIP clip/model.py). It only changes bicubic sample positions.
INTERPOLATE_OFFSET = 0.1


def interpolate_patch_pos_embed(patch_pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(N, D) square-grid patch embeddings -> (h*w, D) for ``grid`` = (h, w).

    Bicubic, ``align_corners=False``, with ``scale_factor = (h + 0.1) / M`` as in DINO/SCLIP, so the
    result equals the authors' code; the native square grid is returned unchanged.
    """
    n, dim = patch_pos.shape
    m = int(math.isqrt(n))
    if m * m != n:
        raise ValueError(f"positional embedding has {n} patch positions, not a square grid")
    h, w = grid
    if (h, w) == (m, m):
        return patch_pos
    src = patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    out = F.interpolate(src, scale_factor=((h + INTERPOLATE_OFFSET) / m, (w + INTERPOLATE_OFFSET) / m),
                        mode="bicubic", align_corners=False)
    if out.shape[-2:] != (h, w):  # float rounding guard; same check as DINO's assert
        raise RuntimeError(f"pos-embed interpolation produced {tuple(out.shape[-2:])}, expected {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(h * w, dim).to(patch_pos.dtype)


def interpolate_patch_pos_embed_to_size(patch_pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(M*M, D) -> (h*w, D) with ``F.interpolate(size=grid, mode="bicubic", align_corners=False)``: an explicit
    target size, no +0.1 offset; unchanged on the stored grid. The rule of PH-Reg's CLIP student
    (0raiser0/PH-Reg @ 1a6f9b8 models/OpenaiMaskCLIP/clip_reg.py ``upsampling_pos_embedding``) and of
    transformers' ``CLIPVisionEmbeddings.interpolate_pos_encoding`` (UniRefiner's tower)."""
    n, dim = patch_pos.shape
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"positional embedding has {n} patch positions, not a square grid")
    if tuple(grid) == (m, m):
        return patch_pos
    src = patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    out = F.interpolate(src, size=(int(grid[0]), int(grid[1])), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(-1, dim).to(patch_pos.dtype)
