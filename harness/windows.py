"""mmseg's sliding-window grid, shared by zero-shot segmentation and the linear probes."""
from __future__ import annotations

from typing import List, Tuple, Union

Window = Tuple[int, int, int, int]  # y1, y2, x1, x2
Size = Union[int, Tuple[int, int]]


def slide_windows(h: int, w: int, crop: Size, stride: Size) -> List[Window]:
    """Windows of mmseg ``slide_inference`` for an (h, w) image; ``crop``/``stride`` are ints or (h, w).

    ``h_grids = max(h - crop + stride - 1, 0) // stride + 1`` (same for w); the last row/column is shifted
    inwards to end at the border, and windows shrink to the image when it is smaller than the crop.
    """
    h_crop, w_crop = (crop, crop) if isinstance(crop, int) else crop
    h_stride, w_stride = (stride, stride) if isinstance(stride, int) else stride
    h_grids = max(h - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w - w_crop + w_stride - 1, 0) // w_stride + 1
    out = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * h_stride, wi * w_stride
            y2, x2 = min(y1 + h_crop, h), min(x1 + w_crop, w)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            out.append((y1, y2, x1, x2))
    return out
