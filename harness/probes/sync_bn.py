"""BatchNorm over the global batch when the batch is split over torchrun processes, on any device.

Why not ``torch.nn.SyncBatchNorm``: it refuses CPU tensors, and the probes must train the same way under
``torchrun`` on CPU (gloo) as on GPUs. mmseg's probe heads use SyncBN (DINOv2 ``BNHead``), i.e. batch statistics
of the whole global batch; this module computes them from all-reduced per-rank sums, so with the global batch
split over ranks the normalisation is the one a single process computes over the whole batch.
"""
from __future__ import annotations

import torch
from torch import nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the global batch (all ranks together).

    Statistics: mean = Σx / N, biased var = Σx² / N − mean² over all ranks' (B, H, W) positions, as BatchNorm
    normalises with; the running variance gets the unbiased N / (N − 1) version, as in ``BatchNorm2d``.
    The all-reduce is differentiable (``torch.distributed.nn``), so gradients are also right when the input
    itself is trained. Outside training, or in a single process, it is a plain ``BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xd = x.transpose(0, 1).reshape(c, -1).to(torch.float64)
        stats = torch.cat([xd.sum(1), (xd * xd).sum(1),
                           torch.tensor([float(xd.shape[1])], dtype=torch.float64, device=x.device)])
        stats = all_reduce(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
            unbiased = var * n / (n - 1).clamp_min(1)
            self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def globalize_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` (in place) by a :class:`GlobalBatchNorm2d` with its state."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(child.weight.device if child.affine else "cpu")
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            globalize_batchnorm(child)
    return module
