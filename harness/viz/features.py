"""Images read at one resolution, and the dense features of every method of a run on them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence

import numpy as np
import torch

from ..image_folder import read_image
from ..methods.base import DenseModel
from ..ovss.inference import shared_trunk_features

#: short side the images are resized to: 448 px, the resize of PH-Reg's OVSS protocol for VOC21 and
#: Context (Chen et al., NeurIPS 2025, arXiv:2505.21501, Table S.5; harness/protocols/ovss/phreg.yaml)
DEFAULT_RESOLUTION = 448


@dataclass
class ViewedImage:
    """One image as the models saw it: the RGB pixels (H, W, 3) uint8 and the normalised tensor (3, H, W)."""

    path: str
    rgb: np.ndarray
    tensor: torch.Tensor


def view_size(width: int, height: int, resolution: int, patch: int) -> tuple:
    """(W, H) with the short side at ``resolution`` and both sides rounded to a multiple of ``patch``.

    The whole image is kept (no crop), so every pixel of the picture has a token; the rounding changes
    the aspect ratio by less than half a patch per side.
    """
    s = resolution / min(width, height)
    return (max(patch, round(width * s / patch) * patch), max(patch, round(height * s / patch) * patch))


def read_view(path: str, resolution: int, patch: int, mean: Sequence[float], std: Sequence[float]) -> ViewedImage:
    """Read ``path`` resized by :func:`view_size` (bicubic); keep the pixels for the figure's image row."""
    from PIL import Image

    pixels: List[np.ndarray] = []

    def view(im: Any) -> Any:
        im = im.resize(view_size(im.size[0], im.size[1], resolution, patch), Image.BICUBIC)
        pixels.append(np.asarray(im, dtype=np.uint8).copy())
        return im

    tensor = read_image(path, view, mean, std)
    return ViewedImage(path=path, rgb=pixels[0], tensor=tensor)


@torch.inference_mode()
def dense_patches(models: Sequence[DenseModel], image: ViewedImage, device: torch.device) -> List[torch.Tensor]:
    """Patch features (C, h, w) of one image for every model, on the CPU in float32.

    The methods of one backbone share the trunk up to the first block any of them touches
    (:func:`~harness.methods.base.forward_dense_many`), as in a multi-method ``harness run``.
    """
    feats = shared_trunk_features(models)(image.tensor.unsqueeze(0).to(device))
    return [f[0].float().cpu() for f in feats]
