"""Probe heads: the DINOv2/DVT linear segmentation head and the AdaBins-style linear depth head.

Both act on the patch grid from :class:`harness.backbones.base.DenseFeatures`; upsampling to the label
size happens in the loss / prediction code, as in mmseg's ``BaseDecodeHead``.
"""
from __future__ import annotations

from typing import Any, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# Defaults of the heads (the recipes' values); the evaluators pass the protocol's ``head`` entry.
#: mmseg BaseDecodeHead init: conv_seg ~ N(0, 0.01), bias 0 (mmseg decode_head.py init_cfg / mmcv normal_init)
SEG_CONV_INIT_STD = 0.01
#: AdaBins-style head of DVT's vitb_nyu_linear_config.py / DINOv2 linear_head.py
#: (Jiawei-Yang/Denoising-ViT@82704df evaluation/configs;
#: facebookresearch/dinov2@b8931f7b dinov2/eval/depth/models/decode_heads/linear_head.py)
DEPTH_BINS = 256
DEPTH_MIN = 1e-3
DEPTH_MAX = 10.0
DEPTH_UPSAMPLE = 4
#: "linear" normalisation: p = (ReLU(z) + 0.1) / sum (DINOv2 decode_head.py depth_pred, eps = 0.1)
DEPTH_NORM_EPS = 0.1


class LinearSegHead(nn.Module):
    """BN + 1x1 conv on patch features: DINOv2's ``BNHead`` (dinov2@b8931f7b ``linear_head.py``): W·BN(f) + b.

    mmseg uses SyncBN over the global batch; a single process uses BatchNorm2d over the same batch,
    which is the same computation when the whole global batch is on one device.
    """

    def __init__(self, in_channels: int, num_classes: int, conv_init_std: float = SEG_CONV_INIT_STD) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv_seg = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=float(conv_init_std))
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features -> (B, K, h, w) logits at patch resolution."""
        return self.conv_seg(self.bn(patch))


class CentredBatch(NamedTuple):
    """Frozen features of one training batch, channels first and centred by their batch mean (see
    :func:`centre_batch`)."""

    x: torch.Tensor  #: (C, M) = features minus the batch mean, M = B*h*w tokens
    mean: torch.Tensor  #: (C,) batch mean
    var: torch.Tensor  #: (C,) biased batch variance (what train-mode BatchNorm normalises with)
    shape: Tuple[int, int, int]  #: (B, h, w)

    @property
    def var_unbiased(self) -> torch.Tensor:
        """What BatchNorm puts into its running variance."""
        n = self.x.shape[1]
        return self.var * n / max(n - 1, 1)


def centre_batch(x: torch.Tensor) -> CentredBatch:
    """Batch statistics of frozen features given channels first, (C, B, h, w), centred in place.

    Why channels first: all heads of the ``fast`` learning-rate grid then become one (heads*K x C) @ (C x M)
    product (:func:`seg_grid_train_logits`); the caller builds this layout straight from the cache.
    """
    c, b, h, w = x.shape
    m = b * h * w
    flat = x.reshape(c, m)
    # two passes, centre then square (no E[x^2] - mean^2 cancellation); the mean as a matrix-vector product
    # and the variance as a vector norm: several times faster on CPU than torch.var_mean over dim 1
    mean = flat @ flat.new_full((m,), 1.0 / m)
    flat.sub_(mean[:, None])
    var = torch.linalg.vector_norm(flat, dim=1).square_() / m
    return CentredBatch(flat, mean, var, (b, h, w))


def seg_grid_train_logits(heads: Sequence[LinearSegHead], batch: CentredBatch) -> torch.Tensor:
    """``[head(feats) for head in heads]`` in train mode, as one (M, heads, K) tensor (M = B*h*w tokens in
    (b, i, j) order; classes last, so the softmax runs over contiguous memory).

    BatchNorm's normalisation and affine are folded into each head's 1x1 conv:
    conv(gamma * (f - mean) * rstd + beta) = (W diag(gamma * rstd)) (f - mean) + (W beta + b), and the heads
    are stacked into one matrix, so a step is one GEMM forward and one backward for the whole grid instead of
    a BatchNorm and a conv per head over every feature. Values and parameter gradients are those of the
    modules' forward; the running statistics are updated as ``BatchNorm2d.forward`` does in train mode
    (momentum, unbiased variance), so the heads' eval mode is unchanged.
    """
    weights, biases = [], []
    for head in heads:
        bn, conv = head.bn, head.conv_seg
        if not head.training:
            raise ValueError("seg_grid_train_logits is the train-mode forward; a head is in eval mode")
        if bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.mul_(1 - m).add_(batch.mean, alpha=m)
                bn.running_var.mul_(1 - m).add_(batch.var_unbiased, alpha=m)
        w = conv.weight[:, :, 0, 0]
        weights.append(w * (bn.weight * torch.rsqrt(batch.var + bn.eps))[None, :])
        biases.append(w @ bn.bias + conv.bias)
    if len({w.shape[0] for w in weights}) != 1:
        raise ValueError("the heads of one grid must have the same number of classes")
    logits = torch.addmm(torch.cat(biases)[None, :], batch.x.t(), torch.cat(weights).t())
    return logits.view(logits.shape[0], len(weights), -1)


def depth_head_input(patch: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """[F ; c·1ᵀ]: patch features with the CLS token broadcast over the grid (DINOv2 linear_head.py)."""
    return torch.cat([patch, cls[:, :, None, None].expand_as(patch)], dim=1)


class DepthBinsHead(nn.Module):
    """×4 bilinear upsampling, 1x1 conv to 256 bins uniform on [0.001, 10] m, linear-normalised expectation.

    Input channels are 2·C (patch ⊕ broadcast CLS, :func:`depth_head_input`); no BatchNorm (the line is
    commented out in DINOv2's depth ``BNHead``, dinov2@b8931f7b). Conv init: PyTorch default, as there.
    """

    def __init__(self, in_channels: int, n_bins: int = DEPTH_BINS, min_depth: float = DEPTH_MIN,
                 max_depth: float = DEPTH_MAX, upsample: int = DEPTH_UPSAMPLE,
                 norm_eps: float = DEPTH_NORM_EPS) -> None:
        super().__init__()
        self.upsample = int(upsample)
        self.norm_eps = float(norm_eps)
        self.conv_depth = nn.Conv2d(in_channels, n_bins, kernel_size=1)
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2C, h, w) -> depth (B, 1, 4h, 4w) in metres."""
        h, w = x.shape[-2:]
        size = (h * self.upsample, w * self.upsample)
        # Bilinear resizing and a 1x1 conv are both linear (and resizing weights sum to 1, so the bias passes
        # through): conv(up(x)) == up(conv(x)). Run the conv on whichever side has fewer channels (2C = 1536 for
        # ViT-B vs 256 bins) -- same function, several times cheaper; ReLU comes after both, as in DINOv2.
        if x.shape[1] > self.conv_depth.out_channels:
            z = F.interpolate(self.conv_depth(x), size=size, mode="bilinear", align_corners=False)
        else:
            z = self.conv_depth(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return self.depth_from_logits(z)

    def depth_from_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, bins, H, W) bin logits -> depth (B, 1, H, W): linear normalisation, expectation over the bins."""
        logit = torch.relu(z) + self.norm_eps
        p = logit / logit.sum(dim=1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", p, self.bins.to(p.dtype)).unsqueeze(1)


class _BinsExpectation(torch.autograd.Function):
    """depth = sum_k (relu(z_k) + eps) b_k / sum_k (relu(z_k) + eps) with a hand-written backward.

    The value of :meth:`DepthBinsHead.depth_from_logits` (the same function, rounded differently); the
    gradient d depth / d z_k = [z_k > 0] (b_k - depth) / S is one pass over the (B, bins, H, W) logits instead
    of autograd's chain through ReLU, the normalisation and the expectation. Both sums come from one 1x1
    convolution with the kernels [1; b]. Used by the ``fast`` v2 depth step only.
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, bins: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: D102
        r = torch.relu(z)
        k = bins.numel()
        kernel = torch.stack([torch.ones_like(bins), bins]).view(2, k, 1, 1)
        sums = F.conv2d(r, kernel)  # (B, 2, H, W): sum_k r_k and sum_k r_k b_k
        s = sums[:, :1] + eps * k
        depth = (sums[:, 1:] + eps * bins.sum()) / s
        ctx.save_for_backward(z, bins, s, depth)
        return depth

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # noqa: D102
        z, bins, s, depth = ctx.saved_tensors
        g = (bins.view(1, -1, 1, 1) - depth) * (grad / s)
        return g.masked_fill_(z <= 0, 0.0), None, None


def depth_head_split_forward(head: DepthBinsHead, patch: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``head(depth_head_input(patch, cls))`` without building the (B, 2C, h, w) input.

    The CLS half of the 1x1 conv is constant over the grid, so it is a per-image bias: W [f ; c] + b =
    W_f f + (W_c c + b). The conv then costs h*w*C*bins per image instead of h*w*2C*bins, and (bilinear
    weights summing to 1) it runs before the upsampling, as the module does for wide inputs. Same function;
    the ``fast`` v2 depth step uses it (with the fused expectation of :class:`_BinsExpectation`), faithful keeps
    the module's forward; v3 drops the upsampling too (:func:`depth_token_grid_train`).
    """
    c = patch.shape[1]
    weight = head.conv_depth.weight[:, :, 0, 0]
    if weight.shape[1] != 2 * c or cls.shape[1] != c:
        raise ValueError(f"head takes {weight.shape[1]} input channels; patch {c} + CLS {cls.shape[1]} given")
    bias = cls @ weight[:, c:].t() + head.conv_depth.bias
    z = F.conv2d(patch, head.conv_depth.weight[:, :c]) + bias[:, :, None, None]
    h, w = patch.shape[-2:]
    z = F.interpolate(z, size=(h * head.upsample, w * head.upsample), mode="bilinear", align_corners=False)
    return _BinsExpectation.apply(z, head.bins.to(z.dtype), head.norm_eps)


def _images_per_chunk(images: int) -> int:
    """Images per chunk of :class:`_TokenGridDepth`: two where they pair up (2 x 1,170 tokens of a 416x544 view
    is where this machine's matrix products stop gaining from longer chunks while the chunk still fits in
    cache), else one."""
    return 2 if images % 2 == 0 else 1


class _TokenGridDepth(torch.autograd.Function):
    """Depth of a grid of bins heads at the token grid: logits z = X W_f^T + bias(image), then the
    linear-normalised expectation over each head's bins, with a hand-written backward.

    The formulas of :class:`_BinsExpectation` with the bins along the last axis. The (tokens, heads*bins)
    logits are the largest tensor of the ``fast`` v3 step (~24M values for 16 NYU views and 5 heads; about
    half in v4's windows of the grid), so they are never held whole: one chunk of images at a time, the product
    (with the image's CLS bias), the ReLU and the two bin sums run on a reused buffer that stays in cache, and
    only the sign of z (a bool per logit) is kept for the backward, which forms dL/dz per chunk in another reused
    buffer and accumulates dL/dW_f += (dL/dz)^T X and dL/dbias. Why: a fresh 96 MB tensor per pass costs page
    faults and memory traffic comparable to the products themselves on a CPU. Nothing saved is modified in the
    backward, so a graph kept with ``retain_graph`` can be differentiated again.

    Outside the two products every pass is one of the CPU's fast elementwise kernels (measured on the 2-core
    AVX2 machine of ``benchmarks/fast_probe.py``, per 2-image chunk): the sign is a bool copy of the ReLU
    output (nonzero exactly where z > 0: 0.4 ms, ``torch.gt`` into bool 1.6 ms); the backward multiplies by
    its bytes as uint8 (a bool factor takes a slow promotion path, 3.6 ms); dL/dz is
    c (b_k - depth) as a subtraction and a product (``addcmul`` with its broadcast 1.5 ms); the bin sums
    multiply by a column-major (bins, 2) kernel (0.9 ms; row-major 2.7 ms).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_f: torch.Tensor, bias: torch.Tensor, bins: torch.Tensor,
                eps: float, heads: int) -> torch.Tensor:  # noqa: D102
        m, b, k, n = x.shape[0], bias.shape[0], bins.numel(), w_f.shape[0]
        t = m // b  # tokens per image
        per = _images_per_chunk(b)
        kernel = torch.stack([torch.ones_like(bins), bins]).t()  # (bins, 2), column-major: sum_k r_k, sum_k r_k b_k
        positive = torch.empty(m, n, dtype=torch.bool, device=x.device)
        sums = x.new_empty(m * heads, 2)
        r = x.new_empty(per * t, n)  # a chunk's logits, reused: stays in cache, no fresh pages per step
        for i in range(0, b, per):
            rows = slice(i * t, (i + per) * t)
            torch.mm(x[rows], w_f.t(), out=r)
            r.view(per, t, n).add_(bias[i:i + per, None, :]).relu_()
            positive[rows].copy_(r)  # nonzero after the ReLU: z > 0
            torch.mm(r.view(-1, k), kernel, out=sums[i * t * heads:(i + per) * t * heads])
        s = sums[:, :1] + eps * k
        depth = (sums[:, 1:] + eps * bins.sum()) / s
        ctx.save_for_backward(x, w_f, positive, bins, s, depth)
        ctx.images = b
        return depth.view(m, heads)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # noqa: D102
        x, w_f, positive, bins, s, depth = ctx.saved_tensors
        m, k, b = x.shape[0], bins.numel(), ctx.images
        t, n = m // b, w_f.shape[0]
        per = _images_per_chunk(b)
        c = grad.reshape(-1, 1) / s  # (M*heads, 1)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = x.new_empty(m, x.shape[1]) if need_x else None
        dw = torch.zeros_like(w_f) if need_w else None
        db = x.new_empty(b, n) if need_b else None
        g = x.new_empty(per * t * n // k, k)  # a chunk's dL/dz, reused
        for i in range(0, b, per):
            rows, hrows = slice(i * t, (i + per) * t), slice(i * t * (n // k), (i + per) * t * (n // k))
            # dL/dz_k = c (b_k - depth) where z_k > 0
            torch.sub(bins[None, :], depth[hrows], out=g)
            g.mul_(c[hrows]).mul_(positive[rows].view(torch.uint8).view(-1, k))
            gi = g.view(per * t, n)
            if need_x:
                torch.mm(gi, w_f, out=dx[rows])
            if need_w:
                dw.addmm_(gi.t(), x[rows])
            if need_b:
                torch.sum(gi.view(per, t, n), 1, out=db[i:i + per])
        return dx, dw, db, None, None, None


def depth_token_grid_train(heads: Sequence[DepthBinsHead], patch: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Every head's depth at the token grid, without the x4 upsampling: the ``fast`` v3 training forward (and
    v4's, on each view's window of the grid).

    Equals ``head(depth_head_input(p, c))`` of a copy of each head with ``upsample=1``, for all heads at once:
    the CLS half of each 1x1 conv is a per-image bias (W [f ; c] + b = W_f f + (W_c c + b)), and the heads'
    patch weights are stacked so that the grid's logits are ONE (M x C) @ (C x heads*bins) product over the
    shared token matrix (as :func:`seg_grid_train_logits` does for segmentation); bins last, so the
    linear-normalised expectation reads contiguous rows (:class:`_TokenGridDepth`: the product and the
    expectation of :class:`_BinsExpectation` in one function with a hand-written backward).

    Args:
        heads: bins heads with the same bins and ``norm_eps`` (one protocol's learning-rate grid).
        patch: (C, B, h, w) features, channels first (:meth:`~harness.probes.cache.FeatureCache.stack_channels_first`).
        cls: (B, C) global tokens.

    Returns:
        (heads, B, 1, h, w) depth in metres, one (B, 1, h, w) map per head for the depth loss.
    """
    c, b, h, w = patch.shape
    first = heads[0]
    weights = [hd.conv_depth.weight[:, :, 0, 0] for hd in heads]
    if any(wt.shape != (first.bins.numel(), 2 * c) for wt in weights) or cls.shape != (b, c):
        raise ValueError(f"heads take {weights[0].shape[1]} input channels and {first.bins.numel()} bins; "
                         f"patch {tuple(patch.shape)} (C, B, h, w) and CLS {tuple(cls.shape)} (B, C) given")
    if any(hd.norm_eps != first.norm_eps or not torch.equal(hd.bins, first.bins) for hd in heads[1:]):
        raise ValueError("the heads of one grid must share their bins and norm_eps")
    n = len(heads)
    w_all = torch.cat(weights)  # (heads*bins, 2C): head j's bins are rows j*k .. (j+1)*k - 1
    bias = torch.addmm(torch.cat([hd.conv_depth.bias for hd in heads])[None, :], cls, w_all[:, c:].t())  # (B, n*k)
    x = patch.reshape(c, b * h * w).t()  # (M, C) tokens in (b, i, j) order, a view of the channels-first batch
    depth = _TokenGridDepth.apply(x, w_all[:, :c], bias, first.bins.to(x.dtype), first.norm_eps, n)  # (M, n)
    return depth.t().reshape(n, b, 1, h, w)  # small: heads*M values


class HeadBank(nn.Module):
    """Several independent heads on the same input (the ``fast`` protocol's learning-rate grid).

    DINOv2's classification ``AllClassifiers`` does the same for linear heads
    (facebookresearch/dinov2@b8931f7b dinov2/eval/linear.py).
    """

    def __init__(self, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def __len__(self) -> int:
        return len(self.heads)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [h(x) for h in self.heads]
