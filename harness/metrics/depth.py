"""Monocular-depth metrics with the toolbox/DVT/DINOv3 semantics: per image, then averaged over images.

Formulas (zhyever/Monocular-Depth-Estimation-Toolbox@d8aff50e ``depth/core/evaluation/metrics.py``),
on the valid pixels of one image, d = ground truth, p = prediction (metres):

* delta_i = mean[max(d/p, p/d) < 1.25**i], i = 1, 2, 3 (fractions in [0, 1])
* abs_rel = mean(|d - p| / d);  sq_rel = mean((d - p)**2 / d)
* rmse = sqrt(mean((d - p)**2));  rmse_log = sqrt(mean((log d - log p)**2))
* log10 = mean|log10 d - log10 p|
* silog = 100 * sqrt(mean(e**2) - mean(e)**2), e = log p - log d

Aggregation: each metric is computed per image and the dataset value is the ``nanmean`` over images
(toolbox ``pre_eval_to_metrics``), so ``rmse`` is the mean of per-image RMSEs, not the RMSE of all
pixels -- the mismatch behind dinov2 #484. Note mmseg 1.x ``DepthMetric`` uses a different ``silog``
(factor 0.5, no x100); we follow the toolbox because DVT's numbers come from it.

Valid pixels (NYU, toolbox ``depth/datasets/nyu.py`` at the same commit): ``min_depth < d < max_depth``
inside the Eigen crop, rows 45:471 and columns 41:601 of a 480x640 map (the default here; the depth
evaluator passes the protocol's ``eigen_crop_box``).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

#: metric names in the order records list them
DEPTH_METRICS: Tuple[str, ...] = ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10",
                                  "silog")
#: lower is better for these (the deltas are higher-is-better)
LOWER_IS_BETTER = frozenset({"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"})

#: Eigen crop for NYU at 480x640: rows 45:471, cols 41:601
#: (zhyever/Monocular-Depth-Estimation-Toolbox@d8aff50e depth/datasets/nyu.py). The default of the functions
#: below; the depth evaluator passes the protocol's ``eigen_crop_box`` (harness/protocols/depth/*.yaml)
EIGEN_CROP: Tuple[int, int, int, int] = (45, 471, 41, 601)
#: the frame size the box is given on: NYUv2's 480x640 (same toolbox file)
EIGEN_CROP_SIZE: Tuple[int, int] = (480, 640)


def eigen_crop_mask(height: int, width: int, device: Optional[torch.device] = None,
                    box: Sequence[int] = EIGEN_CROP) -> torch.Tensor:
    """Boolean (H, W) mask of the Eigen crop ``box`` = (row0, row1, col0, col1) on a 480x640 frame; for other
    sizes the box is scaled (as DINOv3 does)."""
    y0, y1, x0, x1 = (int(v) for v in box)
    if (height, width) != EIGEN_CROP_SIZE:
        sy, sx = height / EIGEN_CROP_SIZE[0], width / EIGEN_CROP_SIZE[1]
        y0, y1, x0, x1 = int(y0 * sy), int(y1 * sy), int(x0 * sx), int(x1 * sx)
    m = torch.zeros(height, width, dtype=torch.bool, device=device)
    m[y0:y1, x0:x1] = True
    return m


def valid_depth_mask(gt: torch.Tensor, min_depth: float, max_depth: float, eigen_crop: bool,
                     eigen_crop_box: Sequence[int] = EIGEN_CROP) -> torch.Tensor:
    """Pixels that count: ``min_depth < gt < max_depth`` (and inside the Eigen crop when asked)."""
    mask = (gt > min_depth) & (gt < max_depth)
    if eigen_crop:
        mask &= eigen_crop_mask(gt.shape[-2], gt.shape[-1], gt.device, eigen_crop_box)
    return mask


def image_depth_metrics(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    """All :data:`DEPTH_METRICS` for one image over ``mask`` (NaN for every metric if no pixel is valid)."""
    p = pred[mask].double()
    d = gt[mask].double()
    if d.numel() == 0:
        return {k: math.nan for k in DEPTH_METRICS}
    thresh = torch.maximum(d / p, p / d)
    diff = d - p
    err_log = torch.log(p) - torch.log(d)
    return {
        "delta1": float((thresh < 1.25).double().mean()),
        "delta2": float((thresh < 1.25 ** 2).double().mean()),
        "delta3": float((thresh < 1.25 ** 3).double().mean()),
        "abs_rel": float((diff.abs() / d).mean()),
        "sq_rel": float((diff ** 2 / d).mean()),
        "rmse": float(torch.sqrt((diff ** 2).mean())),
        "rmse_log": float(torch.sqrt((err_log ** 2).mean())),
        "log10": float((torch.log10(d) - torch.log10(p)).abs().mean()),
        "silog": float(torch.sqrt(torch.clamp((err_log ** 2).mean() - err_log.mean() ** 2, min=0.0)) * 100.0),
    }


class DepthAccumulator:
    """Collects per-image depth metrics and averages them (``nanmean`` over images).

    Example:
        >>> acc = DepthAccumulator(min_depth=1e-3, max_depth=10.0, eigen_crop=False)
        >>> acc.update(torch.full((4, 4), 2.0), torch.full((4, 4), 2.0))
        >>> acc.compute()["rmse"]
        0.0
    """

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = True,
                 eigen_crop_box: Sequence[int] = EIGEN_CROP) -> None:
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)
        self.eigen_crop = bool(eigen_crop)
        self.eigen_crop_box = tuple(int(v) for v in eigen_crop_box)
        self.per_image: List[Dict[str, float]] = []
        #: after :meth:`all_reduce`: the sums, counts and image count of every rank together
        self.reduced: Optional[torch.Tensor] = None

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> Dict[str, float]:
        """Add one image: ``pred`` and ``gt`` are (H, W) depth maps in metres. Returns its metrics."""
        if self.reduced is not None:
            raise ValueError("this accumulator was reduced over the ranks; it takes no more images")
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(gt.shape)}")
        mask = valid_depth_mask(gt, self.min_depth, self.max_depth, self.eigen_crop, self.eigen_crop_box)
        m = image_depth_metrics(pred, gt, mask)
        self.per_image.append(m)
        return m

    def merge(self, other: "DepthAccumulator") -> "DepthAccumulator":
        self.per_image.extend(other.per_image)
        return self

    def totals(self) -> torch.Tensor:
        """float64 [sum of each metric over its non-NaN images, count of those images, images]: what the mean
        over images needs, in a form that adds up over ranks."""
        sums = [math.fsum(m[k] for m in self.per_image if not math.isnan(m[k])) for k in DEPTH_METRICS]
        counts = [sum(1 for m in self.per_image if not math.isnan(m[k])) for k in DEPTH_METRICS]
        return torch.tensor(sums + counts + [len(self.per_image)], dtype=torch.float64)

    def all_reduce(self, reduce: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Add up the :meth:`totals` of every rank of an initialised ``torch.distributed`` group (images sharded
        over torchrun processes), so :meth:`compute` and ``len`` describe the whole split. ``reduce`` (an in-place
        sum over ranks) replaces ``torch.distributed.all_reduce``; without either this is a no-op."""
        t = self.totals()
        if reduce is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
                return
            t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t)
            t = t.cpu()
        else:
            reduce(t)
        self.reduced = t

    def __len__(self) -> int:
        return int(self.reduced[-1]) if self.reduced is not None else len(self.per_image)

    def compute(self) -> Dict[str, float]:
        """Mean over images of each metric, skipping images without valid pixels (NaN)."""
        out: Dict[str, float] = {}
        if self.reduced is not None:
            n = len(DEPTH_METRICS)
            for i, k in enumerate(DEPTH_METRICS):
                count = float(self.reduced[n + i])
                out[k] = float(self.reduced[i]) / count if count else math.nan
            return out
        for k in DEPTH_METRICS:
            vals = [m[k] for m in self.per_image if not math.isnan(m[k])]
            out[k] = float(sum(vals) / len(vals)) if vals else math.nan
        return out
