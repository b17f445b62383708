"""Segmentation metrics with mmseg ``IoUMetric`` semantics, accumulated as mergeable per-class areas.

Semantics (mmseg 1.x ``IoUMetric.intersect_and_union`` / ``total_area_to_metrics``):
pixels whose label equals ``ignore_index`` are dropped; per class we sum, over the whole split, the
areas of intersection, union, prediction and label; IoU = I/U and Acc = I/label per class; mIoU and mAcc
are the ``nanmean`` over classes (a class absent from both prediction and label is NaN and skipped);
aAcc = sum(I) / sum(label). Predictions outside [0, num_classes) count towards no class (as ``histc``).

Counts are int64 (mmseg uses float ``histc`` per image, exact below 2**24 pixels per image), so shards
can be summed exactly and merged across processes with :meth:`IoUAccumulator.all_reduce`.

The areas live on the device of the predictions (``device``) and :meth:`IoUAccumulator.update` never reads a
value back to the host: no boolean-mask indexing and no ``bincount`` (on CUDA both wait for the GPU to learn an
output size); every pixel is scattered into one bin per class plus a spare bin for the pixels no class counts.
The host sees the areas only when they are saved or turned into metrics.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch


class IoUAccumulator:
    """Accumulates per-class areas over a split.

    Example:
        >>> acc = IoUAccumulator(2)
        >>> acc.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 255]]))
        >>> round(acc.compute()["mIoU"], 2)
        50.0
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: Optional[torch.device] = None) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        # rows: intersect, union, pred, label
        self.areas = torch.zeros(4, self.num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one image (or a batch): integer tensors of equal shape, moved to the areas' device if elsewhere."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        dev, n = self.areas.device, self.num_classes
        pred = pred.reshape(-1).to(dev, torch.int64)
        label = label.reshape(-1).to(dev, torch.int64)
        keep = label != self.ignore_index

        def bins(x: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
            """Class bin of each pixel counted (ids 0..n-1); bin n collects the rest and is dropped."""
            return torch.where(counted & (x >= 0) & (x < n), x, n)

        # rows of (n + 1) bins: intersection, prediction, label
        idx = torch.cat([bins(pred, keep & (pred == label)), bins(pred, keep) + (n + 1),
                         bins(label, keep) + 2 * (n + 1)])
        counts = torch.zeros(3 * (n + 1), dtype=torch.int64, device=dev).scatter_add_(0, idx, torch.ones_like(idx))
        inter, area_pred, area_label = counts.view(3, n + 1)[:, :n]
        self.areas += torch.stack([inter, area_pred + area_label - inter, area_pred, area_label])

    def merge(self, other: "IoUAccumulator") -> "IoUAccumulator":
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge accumulators with different class counts")
        self.areas += other.areas.to(self.areas.device)
        return self

    def all_reduce(self) -> None:
        """Sum areas over all ranks of an initialised ``torch.distributed`` group (no-op otherwise)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            t = self.areas.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t)
            self.areas = t.cpu()

    def state_dict(self) -> Dict[str, List[List[int]]]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "areas": self.areas.tolist()}

    @classmethod
    def from_state_dict(cls, d: Dict, device: Optional[torch.device] = None) -> "IoUAccumulator":
        acc = cls(d["num_classes"], d["ignore_index"])
        acc.areas = torch.tensor(d["areas"], dtype=torch.int64, device=device)
        return acc

    def compute(self) -> Dict[str, object]:
        """mIoU, mAcc, aAcc (in %, unrounded) and per-class IoU/Acc lists (in %, NaN where undefined)."""
        host = self.areas.cpu()  # the one read-back of the areas
        inter, union, _, label = (host[i].double().numpy() for i in range(4))
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / union
            acc = inter / label
            aacc = inter.sum() / label.sum() if label.sum() > 0 else float("nan")
        return {
            "mIoU": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan"),
            "mAcc": float(np.nanmean(acc) * 100) if np.isfinite(acc).any() else float("nan"),
            "aAcc": float(aacc * 100),
            "IoU": (iou * 100).tolist(),
            "Acc": (acc * 100).tolist(),
        }
