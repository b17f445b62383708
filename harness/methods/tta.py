"""PH-Reg's test-time-augmentation denoiser as a wrapper over any method (Yan et al., "Vision Transformers
with Self-Distilled Registers", NeurIPS 2025, arXiv:2505.21501, §3.1).

Each image is seen in ``views`` versions: view 0 is the image itself; the others are shifted by whole
patches and, with probability 0.5, flipped horizontally, with out-of-image pixels filled with white
(``(1 - mean) / std`` in normalised space). Every view's patch features are mapped back to the source
positions they show and averaged where visible; the identity view makes every position visible at
least once.

The shifts follow the authors' data code (github.com/0raiser0/PH-Reg, ``Flickr30Dataset.__getitem__`` and
the teacher's ``recover_images``): a pool of ``10 * views`` integer offsets drawn uniformly in
``[-s, s]`` patches with ``s = round(0.15 * n)``, ``views`` of them picked by farthest-point sampling from a
random start, then offset 0 set to (0, 0) and flip 0 to False. ``n`` is the grid size along each axis
(the authors use square inputs). The draw is seeded (``seed``), so a run is reproducible and every image
of a batch gets the same views: a batch equals its images one at a time.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from ..backbones.base import Backbone, DenseFeatures
from ..errors import ConfigError
from ..registry import METHODS
from .base import Forward, Method

View = Tuple[int, int, bool]  # (dy, dx) in patches, horizontal flip


def farthest_points(points: np.ndarray, k: int, rng: np.random.Generator) -> List[int]:
    """Indices of ``k`` points picked by farthest-point sampling (Euclidean) from a random start."""
    chosen = [int(rng.integers(len(points)))]
    dist = np.linalg.norm(points - points[chosen[0]], axis=1)
    while len(chosen) < k:
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(points - points[nxt], axis=1))
    return chosen


def view_plan(grid: Tuple[int, int], views: int, shift_frac: float = 0.15, flip_prob: float = 0.5,
              seed: int = 0, pool_factor: int = 10) -> List[View]:
    """The ``views`` (dy, dx, flip) of PH-Reg's TTA for a patch grid; view 0 is the identity."""
    rng = np.random.default_rng(seed)
    sy, sx = (int(round(shift_frac * n)) for n in grid)
    pool = np.stack([rng.integers(-sy, sy + 1, pool_factor * views),
                     rng.integers(-sx, sx + 1, pool_factor * views)], axis=1)
    offsets = pool[farthest_points(pool.astype(np.float64), views, rng)]
    flips = rng.random(views) < flip_prob
    offsets[0], flips[0] = (0, 0), False
    return [(int(dy), int(dx), bool(f)) for (dy, dx), f in zip(offsets, flips)]


def apply_view(images: torch.Tensor, view: View, patch: int, fill: torch.Tensor) -> torch.Tensor:
    """``out[y, x] = in[y + dy*p, x + dx*p]`` (``fill`` outside), then the horizontal flip if drawn."""
    dy, dx, flip = view
    _, _, h, w = images.shape
    out = fill.view(1, -1, 1, 1).to(images).expand_as(images).clone()
    oy, ox = dy * patch, dx * patch
    ys, yd = slice(max(oy, 0), min(h + oy, h)), slice(max(-oy, 0), min(h - oy, h))
    xs, xd = slice(max(ox, 0), min(w + ox, w)), slice(max(-ox, 0), min(w - ox, w))
    out[:, :, yd, xd] = images[:, :, ys, xs]
    return out.flip(-1) if flip else out


def source_positions(grid: Tuple[int, int], view: View) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each patch position of a view: the source position it shows (flattened) and whether it exists."""
    h, w = grid
    dy, dx, flip = view
    r = torch.arange(h).view(-1, 1).expand(h, w)
    c = torch.arange(w).view(1, -1).expand(h, w)
    if flip:
        c = w - 1 - c
    sr, sc = r + dy, c + dx
    valid = (sr >= 0) & (sr < h) & (sc >= 0) & (sc < w)
    return (sr * w + sc).reshape(-1), valid.reshape(-1)


@METHODS.register("tta")
class TTADenoiser(Method):
    """PH-Reg's TTA denoiser: features averaged over patch-shifted, flipped views (wraps any method)."""

    TOUCHES = ("wrapper",)
    # PH-Reg: --counts 10, --shift_frac 0.15, flip ~ Bernoulli(0.5) (0raiser0/PH-Reg training scripts)
    PARAMS = {"views": 10, "shift_frac": 0.15, "flip_prob": 0.5, "seed": 0}
    CONFIG = {"fill": "white", "pool_factor": 10, "view0": "identity", "average": "visible views"}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if int(self.params["views"]) < 1:
            raise ConfigError(f"method 'tta': views must be >= 1 (got {self.params['views']})")

    def wrap(self, forward: Forward, images: torch.Tensor) -> DenseFeatures:
        spec = self._spec
        p = spec.patch_size
        h, w = images.shape[-2] // p, images.shape[-1] // p
        images = images[..., :h * p, :w * p]  # what the patch embedding sees; keeps flips on the grid
        views = view_plan((h, w), int(self.params["views"]), float(self.params["shift_frac"]),
                          float(self.params["flip_prob"]), int(self.params["seed"]))
        fill = (1.0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
        batch = torch.cat([apply_view(images, v, p, fill) for v in views]) if len(views) > 1 else images
        feats = forward(batch)
        b = images.shape[0]
        c = feats.patch.shape[1]
        total = feats.patch.new_zeros(b, c, h * w)
        count = feats.patch.new_zeros(1, 1, h * w)
        for i, v in enumerate(views):
            src, valid = source_positions((h, w), v)
            src, valid = src.to(total.device), valid.to(total.device)
            f = feats.patch[i * b:(i + 1) * b].reshape(b, c, h * w)
            total.index_add_(2, src[valid], f[:, :, valid])
            count.index_add_(2, src[valid], torch.ones_like(f[:1, :1, valid]))
        patch = (total / count).reshape(b, c, h, w)
        n = len(views)
        cls = None if feats.cls is None else feats.cls.reshape(n, b, -1).mean(0)
        regs = feats.registers.reshape(n, b, *feats.registers.shape[1:]).mean(0)
        return DenseFeatures(patch=patch, cls=cls, registers=regs)

    def bind(self, backbone: Backbone, weights_path: Optional[str]) -> Optional[str]:
        self._spec = backbone.spec  # patch size, mean and std of the views' fill
        return super().bind(backbone, weights_path)
