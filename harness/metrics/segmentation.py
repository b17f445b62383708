"""Segmentation metrics with mmseg ``IoUMetric`` semantics, accumulated as mergeable per-class areas.

Semantics (mmseg 1.x ``IoUMetric.intersect_and_union`` / ``total_area_to_metrics``):
pixels whose label equals ``ignore_index`` are dropped; per class we sum, over the whole split, the
areas of intersection, union, prediction and label; IoU = I/U and Acc = I/label per class; mIoU and mAcc
are the ``nanmean`` over classes (a class absent from both prediction and label is NaN and skipped);
aAcc = sum(I) / sum(label). Predictions outside [0, num_classes) count towards no class (as ``histc``).

Counts are int64 (mmseg uses float ``histc`` per image, exact below 2**24 pixels per image), so shards
can be summed exactly and merged across processes with :meth:`IoUAccumulator.all_reduce`.
"""
from __future__ import annotations

from typing import Dict, List

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

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        # rows: intersect, union, pred, label
        self.areas = torch.zeros(4, self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one image (or a batch): integer tensors of equal shape."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        pred = pred.reshape(-1).to(torch.int64).cpu()
        label = label.reshape(-1).to(torch.int64).cpu()
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        n = self.num_classes

        def hist(x: torch.Tensor) -> torch.Tensor:
            x = x[(x >= 0) & (x < n)]
            return torch.bincount(x, minlength=n)[:n]

        inter = hist(pred[pred == label])
        area_pred, area_label = hist(pred), hist(label)
        self.areas += torch.stack([inter, area_pred + area_label - inter, area_pred, area_label])

    def merge(self, other: "IoUAccumulator") -> "IoUAccumulator":
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge accumulators with different class counts")
        self.areas += other.areas
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
    def from_state_dict(cls, d: Dict) -> "IoUAccumulator":
        acc = cls(d["num_classes"], d["ignore_index"])
        acc.areas = torch.tensor(d["areas"], dtype=torch.int64)
        return acc

    def compute(self) -> Dict[str, object]:
        """mIoU, mAcc, aAcc (in %, unrounded) and per-class IoU/Acc lists (in %, NaN where undefined)."""
        inter, union, _, label = (self.areas[i].double().numpy() for i in range(4))
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
