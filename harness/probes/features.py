"""From images to probe inputs and predictions: centre padding, dense features, sliding windows, flip TTA.

Padding: DVT/DINOv2 register a forward pre-hook ``CenterPadding(patch)`` on the backbone that zero-pads
the *normalised* image symmetrically up to a multiple of the patch size (512 -> 518 = 37 patches for /14;
Jiawei-Yang/Denoising-ViT@82704df ``evaluation/eval_utils/misc.py``). The head's output is then resized to
the *unpadded* input size
(mmseg ``encode_decode`` / ``BaseDecodeHead.losses``), i.e. the padded border is stretched over the
image, not cropped. We do the same so that numbers are comparable.
"""
from __future__ import annotations

import math
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from ..backbones.base import DenseFeatures
from ..methods.base import DenseModel
from ..windows import slide_windows
from .heads import depth_head_input


def center_pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """DINOv2 ``CenterPadding``: pad H and W to multiples of ``multiple``, left/top gets the floor half."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        new = math.ceil(size / multiple) * multiple
        left = (new - size) // 2
        pads += [left, new - size - left]
    if any(pads):
        x = F.pad(x, pads)
    return x


def padded_grid(hw: Tuple[int, int], patch: int) -> Tuple[int, int]:
    """Token grid of an input of size ``hw`` after centre padding."""
    return math.ceil(hw[0] / patch), math.ceil(hw[1] / patch)


@torch.no_grad()
def dense_features(model: DenseModel, images: torch.Tensor) -> DenseFeatures:
    """Frozen forward of normalised images (any size): centre-pad, then the one dense interface."""
    return model.forward_dense(center_pad(images, model.spec.patch_size))


def resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear, ``align_corners=False`` (mmseg ``resize`` in every head used here)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def slide_logits(logits_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, num_classes: int,
                 crop: Tuple[int, int], stride: Tuple[int, int], batch_size: int) -> torch.Tensor:
    """Sliding-window logits (1, K, H, W) for one normalised image (1, 3, H, W), windows averaged.

    ``logits_fn`` maps windows (n, 3, h, w) to logits already resized to (n, K, h, w).
    """
    _, _, h, w = image.shape
    boxes = slide_windows(h, w, crop, stride)
    out = image.new_zeros(1, num_classes, h, w)
    count = image.new_zeros(1, 1, h, w)
    for i in range(0, len(boxes), max(1, batch_size)):
        chunk = boxes[i:i + max(1, batch_size)]
        windows = torch.cat([image[:, :, y1:y2, x1:x2] for (y1, y2, x1, x2) in chunk])
        logits = logits_fn(windows)
        for j, (y1, y2, x1, x2) in enumerate(chunk):
            out[:, :, y1:y2, x1:x2] += logits[j:j + 1]
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


def depth_from_features(head: torch.nn.Module, feats: DenseFeatures, size: Tuple[int, int]) -> torch.Tensor:
    """Depth (B, 1, H, W) at the unpadded input size from patch ⊕ CLS features."""
    return resize(head(depth_head_input(feats.patch, feats.cls)), size)


@torch.no_grad()
def depth_flip_average(pred_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """DVT test: mean of the prediction and the un-flipped prediction of the flipped image (``aug_test``)."""
    a = pred_fn(images)
    b = pred_fn(images.flip(-1)).flip(-1)
    return (a + b) / 2
