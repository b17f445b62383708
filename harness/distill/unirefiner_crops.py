"""UniRefiner's views of an image: the fixed reference image, random crop boxes, crops and the composite of a crop
with a strip of the reference (arXiv:2605.19622; ``unirefiner/method/crops.py`` and ``unirefiner/data/dataset.py``
of github.com/CongpeiQiu/UniRefiner @ 38f4e71b).

The authors' reference image (``assets/backgrounds/fixed_reference.png``) is not ours to copy. By default
:func:`reference_image` generates one, the same on every machine: a seeded scene of a smooth two-tone
background with a faint gradient (the flat, low-information areas where ViT artifacts appear) and six
textured shapes (stripes, checks, pixel noise) around the horizon. ``--reference-image FILE`` uses any
image instead, e.g. the authors' asset.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

#: crops per image, their area share and aspect range (``num_proposals`` 3, ``crop_scale = (0.25, 0.5)``,
#: ``ratio=(2 / 3, 3 / 2)`` in UniRefinerMethod.forward)
PROPOSALS = 3
CROP_SCALE = (0.25, 0.5)
CROP_RATIO = (2 / 3, 3 / 2)
#: reference strip width as a share of the crop's token width, rounded up to even (``ratio=0.35``)
STRIP_RATIO = 0.35
#: the generated reference image: size and seed (ours; any fixed values work, these are recorded)
REFERENCE_SIZE = 512
REFERENCE_SEED = 20260525
REFERENCE_SHAPES = 6


def reference_image(size: int = REFERENCE_SIZE, seed: int = REFERENCE_SEED) -> np.ndarray:
    """(size, size, 3) uint8: the deterministic generated reference scene (module docstring).

    Two flat tones split at a horizon with a faint gradient and faint noise cover most of the picture (the
    low-information areas where ViT artifacts appear), and ``REFERENCE_SHAPES`` textured shapes sit in a band
    around the horizon, so that any crop of the edge strip holds flat background as well as content.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / float(size)
    top, bottom = rng.uniform(0.3, 0.9, 3), rng.uniform(0.1, 0.6, 3)
    horizon = 0.5
    img = np.where((yy < horizon)[..., None], top, bottom) + 0.05 * (yy + xx - 1.0)[..., None]
    for _ in range(REFERENCE_SHAPES):
        h, w = rng.integers(size // 12, size // 6, 2)
        y0 = int(rng.integers(int(0.3 * size), int(0.7 * size) - h))
        x0 = int(rng.integers(int(0.2 * size), int(0.8 * size) - w))
        c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        kind = rng.integers(3)
        ys, xs = np.mgrid[0:h, 0:w]
        if kind == 0:  # stripes
            period, ang = rng.integers(6, 20), rng.uniform(0, math.pi)
            m = (np.sin(2 * math.pi * (xs * math.cos(ang) + ys * math.sin(ang)) / period) > 0)[..., None]
        elif kind == 1:  # checks
            cell = rng.integers(4, 16)
            m = (((ys // cell) + (xs // cell)) % 2 == 0)[..., None]
        else:  # pixel noise
            m = (rng.uniform(0, 1, (h, w)) > 0.5)[..., None]
        img[y0:y0 + h, x0:x0 + w] = np.where(m, c1, c2)
    img = img + 0.01 * rng.standard_normal(img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def reference_tensor(size: int, mean: Sequence[float], std: Sequence[float], path: Optional[str] = None
                     ) -> torch.Tensor:
    """(1, 3, size, size) normalised: ``path`` (bicubic resize, as the authors' transform) or the generated one."""
    from PIL import Image

    from ..image_folder import read_image

    if path is not None:
        return read_image(path, lambda im: im.resize((size, size), Image.BICUBIC), mean, std).unsqueeze(0)
    im = Image.fromarray(reference_image()).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).unsqueeze(0)


def crop_boxes(n: int, generator: torch.Generator, scale: Tuple[float, float] = CROP_SCALE,
               ratio: Tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """(n, 4) boxes (x1, y1, x2, y2) in [0, 1]: area ``scale``, log-uniform aspect ``ratio``, clamped centre."""
    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    out = torch.empty(n, 4)
    for i in range(n):
        area = u(*scale)
        while True:  # with these ranges a box fits at once unless the aspect pushes a side past 1
            aspect = math.exp(u(math.log(ratio[0]), math.log(ratio[1])))
            bw, bh = math.sqrt(area * aspect), math.sqrt(area / aspect)
            if bw < 1 and bh < 1:
                break
        cx, cy = u(0, 1), u(0, 1)
        x1 = max(0.0, min(1.0 - bw, cx - bw / 2))
        y1 = max(0.0, min(1.0 - bh, cy - bh / 2))
        out[i] = torch.tensor([x1, y1, x1 + bw, y1 + bh])
    return out


def roi_align(maps: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) maps, (B, P, 4) unit boxes -> (B * P, C, size, size) by torchvision's ``roi_align``
    (``aligned=True``), as ``roi_align_feature_map`` does for crops of images and of token grids."""
    import torchvision.ops as tvops

    b, p, _ = boxes.shape
    h, w = maps.shape[-2:]
    scaled = boxes.to(maps.dtype) * torch.tensor([w, h, w, h], dtype=maps.dtype, device=maps.device)
    idx = torch.arange(b, device=maps.device, dtype=maps.dtype).repeat_interleave(p).view(-1, 1)
    rois = torch.cat([idx, scaled.reshape(-1, 4)], dim=1)
    return tvops.roi_align(maps.float(), rois.float(), output_size=(size, size), aligned=True).to(maps.dtype)


def crop_tokens(tokens: torch.Tensor, grid: int, boxes: torch.Tensor) -> torch.Tensor:
    """(B, n*n, D) tokens of a square grid -> (B * P, n*n, D) tokens of each box, resampled to the same grid."""
    b, _, d = tokens.shape
    maps = tokens.transpose(1, 2).reshape(b, d, grid, grid)
    return roi_align(maps, boxes, grid).reshape(-1, d, grid * grid).transpose(1, 2)


def strip_tokens(grid: int, ratio: float = STRIP_RATIO) -> int:
    """Width of the reference strip in tokens: ``int(grid * ratio)`` rounded up to even."""
    k = int(grid * ratio)
    return k + 1 if k % 2 else k


def compose(crops: torch.Tensor, reference: torch.Tensor, patch: int, side: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Crop images (P, 3, S, S) + the matching edge strip of the reference (1, 3, S, S) on ``side`` 0 left,
    1 top, 2 right, 3 bottom -> (composites, foreground mask (P, tokens) row-major over the composite grid)."""
    p, c, s, _ = crops.shape
    n = s // patch
    k = strip_tokens(n)
    px = k * patch
    ref = reference.to(crops.dtype).expand(p, -1, -1, -1)
    fg = torch.ones(n, n, dtype=torch.bool)
    if side == 0:
        img, mask = torch.cat([ref[..., :px], crops], -1), torch.cat([torch.zeros(n, k, dtype=torch.bool), fg], 1)
    elif side == 2:
        img, mask = torch.cat([crops, ref[..., -px:]], -1), torch.cat([fg, torch.zeros(n, k, dtype=torch.bool)], 1)
    elif side == 1:
        img, mask = torch.cat([ref[..., :px, :], crops], -2), torch.cat([torch.zeros(k, n, dtype=torch.bool), fg], 0)
    else:
        img, mask = torch.cat([crops, ref[..., -px:, :]], -2), torch.cat([fg, torch.zeros(k, n, dtype=torch.bool)], 0)
    return img, mask.reshape(1, -1).expand(p, -1).to(crops.device)
