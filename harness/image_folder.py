"""Unlabelled image folders (neuron search, distillation, diagnostics): list, load, resize, normalise."""
from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(folder: str, limit: Optional[int] = None) -> List[str]:
    """Image files under ``folder`` (recursively, sorted); a clear error when there are none."""
    if not os.path.isdir(folder):
        raise DataError(f"--images {folder}: no such folder")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise DataError(f"--images {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return paths[:limit] if limit else paths


def read_image(path: str, view: Callable[[Any], Any], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Open ``path`` as RGB, apply ``view`` (PIL image -> PIL image: resize, crop), normalise: (3, H, W).

    Every trainer and search that reads an unlabelled folder goes through here, so an unreadable file is
    always the same one-line :class:`DataError` naming it.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(view(im.convert("RGB")), dtype=np.float32) / 255.0
    except OSError as e:
        raise DataError(f"{path}: cannot read the image ({e})") from e
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def load_image(path: str, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic), centre-crop ``size`` x ``size``, normalise: (3, size, size).

    The resize-then-centre-crop view is what the test-time-register authors use for the neuron search
    (their DINOv2 transform: resize, center crop) and what CLIP's own preprocessing does.
    """
    from PIL import Image

    def view(im: Any) -> Any:
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return im.crop((left, top, left + size, top + size))

    return read_image(path, view, mean, std)
