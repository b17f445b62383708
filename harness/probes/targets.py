"""Training targets on the head's own grid for the ``fast`` v2 probes: a loss whose cost does not grow with pixels.

Why: the v1 ``fast`` step upsampled every head's logits to the 512x512 label and backpropagated a per-pixel
loss there; on CPU that was ~99 % of a step while the heads themselves cost milliseconds. v2 moves the label
to the head's grid once, when the features are cached, and trains there.

Which pixels a grid cell covers: the cell whose centre is nearest under the same coordinate map as the
bilinear ``align_corners=False`` resize that stretches the head's output over the label (mmseg ``resize``,
used by the faithful loss and by every prediction here). Label pixel ``y`` of ``H`` belongs to cell
``floor((y + 0.5) * h / H)`` of ``h`` -- PyTorch's ``nearest-exact`` interpolation. Consequences:

* segmentation: with ``counts[k, i, j]`` = number of non-ignored label pixels of class ``k`` in cell
  ``(i, j)``, ``sum_ij sum_k -counts[k,i,j] log softmax(z)[k,i,j] / (H W)`` *equals* mmseg's cross-entropy
  (``avg_non_ignore=False``, ignored pixels in the denominator) of the logits ``z`` upsampled with
  ``nearest-exact`` instead of bilinearly. The target is the cell's label histogram (soft target), weighted
  by how many labelled pixels it has.
* depth: the target of a cell is the mean of its valid (> 0) depth pixels, 0 (= invalid) when it has none.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np
import torch

from ..io_safety import file_lock
from ..runtime import progress as progress_bar
from .cache import FeatureCache

#: float16 holds every integer up to 2**11 exactly, so per-cell pixel counts are stored exactly up to this
FP16_EXACT_INT = 2048


def cell_index(size: int, cells: int) -> np.ndarray:
    """For each of ``size`` pixels along one axis, the index of the cell (of ``cells``) that covers it.

    ``floor((y + 0.5) * cells / size)`` -- PyTorch ``nearest-exact`` (the pixel centre mapped by the
    ``align_corners=False`` rule onto the cell grid), computed in integers: ``(2y + 1) * cells // (2 size)``.
    """
    if size < 1 or cells < 1:
        raise ValueError(f"cannot map {size} pixels onto {cells} cells")
    y = np.arange(size, dtype=np.int64)
    return (2 * y + 1) * cells // (2 * size)


def label_counts(label: np.ndarray, grid: Tuple[int, int], num_classes: int, ignore_index: int) -> np.ndarray:
    """(K, h, w) float32: per grid cell, how many label pixels of each class it covers (``ignore_index`` skipped).

    Raises ``ValueError`` for a label value that is neither a class nor ``ignore_index``.
    """
    label = np.asarray(label)
    h, w = int(grid[0]), int(grid[1])
    rows, cols = cell_index(label.shape[0], h), cell_index(label.shape[1], w)
    cell = rows[:, None] * w + cols[None, :]
    valid = label != ignore_index
    lab = label[valid].astype(np.int64)
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"label values must be < {num_classes} or {ignore_index}; found {int(lab.max())}")
    flat = np.bincount(lab * (h * w) + cell[valid], minlength=num_classes * h * w)
    return flat.reshape(num_classes, h, w).astype(np.float32)


def masked_mean_pool(depth: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
    """(h, w) float32: per grid cell, the mean of its valid (> 0) depth values; 0 where a cell has none."""
    depth = np.asarray(depth, dtype=np.float64)
    h, w = int(grid[0]), int(grid[1])
    rows, cols = cell_index(depth.shape[0], h), cell_index(depth.shape[1], w)
    cell = (rows[:, None] * w + cols[None, :]).ravel()
    d = depth.ravel()
    valid = d > 0
    total = np.bincount(cell[valid], weights=d[valid], minlength=h * w)
    count = np.bincount(cell[valid], minlength=h * w)
    out = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return out.reshape(h, w).astype(np.float32)


def token_seg_loss(logits: torch.Tensor, counts: torch.Tensor, num_pixels: int, class_dim: int = 1) -> torch.Tensor:
    """Cross-entropy on the head's grid against per-cell label histograms (see the module doc).

    ``logits`` and ``counts`` have the same shape, classes along ``class_dim`` ((B, K, h, w) by default,
    or (K, M) tokens with ``class_dim=0``). The sum over cells and classes of ``-counts * log_softmax`` is
    divided by ``num_pixels``, the batch's label pixel count with ignored pixels included, as mmseg's
    ``avg_non_ignore=False`` cross-entropy does at full resolution.
    """
    if logits.shape != counts.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and label counts {tuple(counts.shape)} differ in shape")
    logp = torch.log_softmax(logits, dim=class_dim)
    return -(counts.to(logp.dtype) * logp).sum() / int(num_pixels)


def token_seg_losses(logits: torch.Tensor, counts: torch.Tensor, num_pixels: int) -> torch.Tensor:
    """:func:`token_seg_loss` of a whole head grid at once: logits (M, heads, K), counts (M, K) -> (heads,)."""
    if logits.dim() != 3 or counts.shape != (logits.shape[0], logits.shape[2]):
        raise ValueError(f"logits (M, heads, K) {tuple(logits.shape)} and counts (M, K) {tuple(counts.shape)} "
                         f"do not match")
    logp = torch.log_softmax(logits, dim=-1)
    return -(counts.to(logp.dtype)[:, None, :] * logp).sum(dim=(0, 2)) / int(num_pixels)


def derive_cache(src: FeatureCache, dst: FeatureCache, item: Callable[[int], Dict[str, np.ndarray]],
                 show_progress: bool, desc: str) -> FeatureCache:
    """Fill ``dst`` with ``item(i)`` for every item ``i`` of the complete cache ``src`` (resumable, once).

    Why a sibling cache rather than a new field of ``src``: the features of v1 and v2 are the same, so an
    existing feature cache is reused and only the (cheap) targets are computed.
    """
    if not src.complete:
        raise ValueError(f"cannot derive targets from the incomplete cache {src.path}")
    # one writer: under torchrun (or a second run) the others wait for the lock, then find it complete
    with file_lock(dst.path, "feature cache"):
        dst.reload()
        return _derive(src, dst, item, show_progress, desc)


def _derive(src: FeatureCache, dst: FeatureCache, item: Callable[[int], Dict[str, np.ndarray]],
            show_progress: bool, desc: str) -> FeatureCache:
    start = dst.open_for_write()
    if dst.complete:
        dst.close()
        return dst
    bar = progress_bar(total=len(src), desc=desc, enabled=show_progress)
    bar.update(start)
    try:
        for i in range(start, len(src)):
            dst.append(item(i))
            bar.update(1)
        dst.finish()
    except BaseException:
        dst.close()
        raise
    finally:
        bar.close()
    return dst
