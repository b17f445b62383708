"""Sliding-window dense logits and SCLIP-lineage post-processing, batched across windows and images.

Follows mmseg ``slide_inference`` / SCLIP ``forward_slide`` (SCLIP@b56bd30 clip_segmentor.py): windows on the grid
``h_grids = max(H - c + s - 1, 0) // s + 1`` with the last window aligned to the border; per window the
patch features are L2-normalised, compared (cosine) with the text queries, bilinearly upsampled to the
window size (``align_corners=False``); window logits are summed and divided by the coverage count; the
map is finally resized bilinearly to the original image size. ``whole`` mode encodes the resized image
once and upsamples straight to the original size (SCLIP ``forward_feature(img, ori_shape)``).

Unlike the reference loop (one window at a time), all windows of all images in a batch are grouped by
shape and sent through the backbone together, in chunks of ``batch_size``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..methods.base import DenseModel, forward_dense_many
from ..profiling import OFF, StageTimer
from ..runtime import precision_context
from ..windows import Window, slide_windows

FeatureFn = Callable[[torch.Tensor], List[torch.Tensor]]


def shared_trunk_features(models: Sequence[DenseModel], precision: str = "fp32") -> FeatureFn:
    """Patch features of several methods on one backbone, sharing what the dense interface says they share.

    :func:`~harness.methods.base.forward_dense_many` computes the plain trunk once, up to each method's
    first touched block (a method that adds tokens at the input, or wraps the forward, runs on its own).
    ``precision`` is the protocol's (fp32, or bf16 autocast on any device); features come back as fp32.
    """
    models = list(models)

    def run(x: torch.Tensor) -> List[torch.Tensor]:
        with precision_context(precision, x.device):
            return [f.patch.float() for f in forward_dense_many(models, x)]

    return run


def _cosine(feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    feats = feats / feats.norm(dim=1, keepdim=True)
    return torch.einsum("nchw,qc->nqhw", feats, text.float())


@dataclass
class ImageJob:
    """One image to segment: normalised (3, H, W) tensor at the protocol resolution, and its original size."""

    image: torch.Tensor
    ori_size: Tuple[int, int]


def dense_logits(features: FeatureFn, jobs: Sequence[ImageJob], text: torch.Tensor, mode: str, crop: int,
                 stride: int, batch_size: int, timer: StageTimer = OFF) -> List[List[torch.Tensor]]:
    """Logits (Q, H0, W0) at each job's original size, per method: ``out[method][job]``.

    All windows of all jobs are grouped by shape and computed in shared batches of ``batch_size``.
    ``timer`` charges the backbone calls to ``backbone`` and the rest (cosine, upsampling, window sums)
    to ``upsampling``. Window positions are Python integers and nothing is read back from the device, so on a
    GPU the host queues every window without waiting (tests/ovss/test_gpu_path.py counts the syncs).
    """
    if mode not in ("slide", "whole"):
        raise ValueError(f"unknown inference mode {mode!r} (slide or whole)")
    # a "whole" image is a single window covering it
    wins = [slide_windows(j.image.shape[-2], j.image.shape[-1], crop, stride) if mode == "slide"
            else [(0, j.image.shape[-2], 0, j.image.shape[-1])] for j in jobs]
    pending: Dict[Tuple[int, int], List[Tuple[int, Window]]] = {}
    for i, ws in enumerate(wins):
        for win in ws:
            pending.setdefault((win[1] - win[0], win[3] - win[2]), []).append((i, win))
    sums: Optional[List[List[torch.Tensor]]] = None
    counts = [torch.zeros(1, *j.image.shape[-2:], device=text.device) for j in jobs]
    for items in pending.values():
        for c in range(0, len(items), batch_size):
            chunk = items[c:c + batch_size]
            with timer.stage("backbone"):
                crops = torch.stack([jobs[i].image[:, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in chunk])
                feats = features(crops)
            with timer.stage("upsampling"):
                sums = _add_windows(feats, text, chunk, crops.shape[-2:], jobs, mode, sums, counts)
    assert sums is not None
    if mode == "whole":
        return sums
    with timer.stage("upsampling"):
        return [[F.interpolate((s / cnt).unsqueeze(0), size=j.ori_size, mode="bilinear", align_corners=False)[0]
                 for s, cnt, j in zip(per_job, counts, jobs)] for per_job in sums]


def _add_windows(feats: List[torch.Tensor], text: torch.Tensor, chunk: Sequence[Tuple[int, Window]],
                 size: Tuple[int, int], jobs: Sequence[ImageJob], mode: str,
                 sums: Optional[List[List[torch.Tensor]]], counts: List[torch.Tensor]) -> List[List[torch.Tensor]]:
    """Cosine logits of one chunk of windows, upsampled and added into ``sums``/``counts`` (created on first use)."""
    q = text.shape[0]
    per_method = [_cosine(f, text) for f in feats]
    if mode == "slide":  # windows of one group share their shape: upsample the chunk at once
        per_method = [F.interpolate(lg, size=tuple(size), mode="bilinear", align_corners=False) for lg in per_method]
    if sums is None:
        sums = [[torch.zeros(q, *j.image.shape[-2:], device=text.device) for j in jobs] for _ in per_method]
    for k, (i, (y1, y2, x1, x2)) in enumerate(chunk):
        if mode == "whole":  # SCLIP forward_feature(img, ori_shape): grid -> original size directly
            for m, lg in enumerate(per_method):
                sums[m][i] = F.interpolate(lg[k:k + 1], size=jobs[i].ori_size, mode="bilinear",
                                           align_corners=False)[0]
            continue
        for m, lg in enumerate(per_method):
            sums[m][i][:, y1:y2, x1:x2] += lg[k]
        counts[i][:, y1:y2, x1:x2] += 1
    return sums


def postprocess(logits: torch.Tensor, query_class: torch.Tensor, num_classes: int, logit_scale: float,
                prob_thd: float = 0.0, area_thd: Optional[float] = None) -> torch.Tensor:
    """(Q, H, W) cosine logits -> (H, W) class indices (wangf3014/SCLIP@b56bd30 ``postprocess_result``).

    Runs on the logits' device without reading any value back to the host (no per-image GPU sync).

    softmax(τ·cos) over all queries; per class the max over its queries; optional area threshold (a
    non-background class whose predicted area is ≤ area_thd × all non-background predicted area is
    zeroed); argmax; pixels whose max probability is below ``prob_thd`` become class 0.
    """
    probs = torch.softmax(logits.float() * logit_scale, dim=0)
    if probs.shape[0] != num_classes:
        cls_probs = torch.full((num_classes, *probs.shape[1:]), float("-inf"), device=probs.device)
        cls_probs = cls_probs.scatter_reduce(0, query_class.view(-1, 1, 1).expand_as(probs), probs, reduce="amax",
                                             include_self=True)
    else:
        cls_probs = probs
    if area_thd is not None:
        pred = cls_probs.argmax(0).reshape(-1)
        # the predicted area of each class, counted on the device (``bincount`` would wait for a GPU to read the
        # largest index back to size its output)
        area = torch.zeros(num_classes, dtype=torch.int64, device=pred.device)
        area = area.scatter_add_(0, pred, torch.ones_like(pred)).to(cls_probs.dtype)
        area[0] = 0  # SCLIP: areas of classes 1.. only ("prone to ignore background areas")
        keep = (area > area_thd * area.sum()).to(cls_probs.dtype)
        keep[0] = 1
        cls_probs = cls_probs * keep.view(-1, 1, 1)
    maxp, pred = cls_probs.max(0)
    return pred.masked_fill_(maxp < prob_thd, 0)  # not ``pred[mask] = 0``: boolean indexing syncs on a GPU
