"""Data for the probes: mmseg pipelines, deterministic per-sample augmentation, batching.

Why per-sample seeding: mmseg/mmcv transforms draw from numpy's and Python's global RNGs. We seed both
from (run seed, iteration, slot) right before each sample's pipeline runs, and pick the image for a
slot from a seeded per-epoch permutation. So the batch of iteration *i* is a pure function of the seed
and *i*, independent of worker count and of whether the run was interrupted and resumed.

Two transforms the mmseg 1.x registry lacks are registered here, ported from the depth toolbox that
DVT's NYU config uses (zhyever/Monocular-Depth-Estimation-Toolbox ``depth/datasets/pipelines/transforms.py``):
``HarnessNYUCrop`` (img/depth[45:472, 43:608] by default; the depth protocols' ``nyu_crop_box``) and
``HarnessDepthColorAug`` (gamma, brightness, colour).
"""
from __future__ import annotations

import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..compat.mmcv_ops import import_mmseg
from ..runtime import Dist

#: NYUCrop of zhyever/Monocular-Depth-Estimation-Toolbox@d8aff50e (depth/datasets/pipelines/transforms.py):
#: rows 45:472, cols 43:608 of the 480x640 frame. The default of :class:`HarnessNYUCrop`; the depth evaluator
#: passes the protocol's ``nyu_crop_box`` (harness/protocols/depth/*.yaml, same value and source)
NYU_TRAIN_CROP: Tuple[int, int, int, int] = (45, 472, 43, 608)
#: value of padded label pixels (mmseg ``seg_pad_val``); padded depth pixels are 0 (= invalid)
IGNORE_INDEX = 255

_REGISTERED = False


def register_transforms() -> None:
    """Register the harness's extra mmseg transforms once (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import_mmseg()
    from mmcv.transforms import BaseTransform
    from mmseg.registry import TRANSFORMS

    class HarnessNYUCrop(BaseTransform):
        """Toolbox ``NYUCrop(depth=True)``: crop image and depth to ``box`` = (row0, row1, col0, col1), by default
        rows 45:472, cols 43:608 (the white border of the NYU frames)."""

        def __init__(self, box: Sequence[int] = NYU_TRAIN_CROP) -> None:
            if len(box) != 4 or not (0 <= box[0] < box[1] and 0 <= box[2] < box[3]):
                raise ValueError(f"NYU crop box must be (row0, row1, col0, col1) with row0 < row1, col0 < col1; "
                                 f"got {list(box)}")
            self.box = tuple(int(v) for v in box)

        def transform(self, results: Dict[str, Any]) -> Dict[str, Any]:
            y0, y1, x0, x1 = self.box
            results["img"] = results["img"][y0:y1, x0:x1]
            for key in results.get("seg_fields", []):
                results[key] = results[key][y0:y1, x0:x1]
            results["img_shape"] = results["img"].shape[:2]
            return results

    class HarnessDepthColorAug(BaseTransform):
        """Toolbox ``ColorAug``: with probability ``prob``, img**gamma · brightness · per-channel colour, clip 0-255.

        As in the toolbox (and hence DVT), gamma acts on the 0-255 values, not on [0, 1] as in AdaBins.
        """

        def __init__(self, prob: float, gamma_range: Sequence[float], brightness_range: Sequence[float],
                     color_range: Sequence[float]) -> None:
            self.prob = float(prob)
            self.gamma_range = tuple(gamma_range)
            self.brightness_range = tuple(brightness_range)
            self.color_range = tuple(color_range)

        def transform(self, results: Dict[str, Any]) -> Dict[str, Any]:
            if np.random.rand() < self.prob:  # same draw order as the toolbox
                image = results["img"].astype(np.float64)
                gamma = np.random.uniform(min(self.gamma_range), max(self.gamma_range))
                image_aug = image ** gamma
                brightness = np.random.uniform(min(self.brightness_range), max(self.brightness_range))
                image_aug = image_aug * brightness
                colors = np.random.uniform(min(self.color_range), max(self.color_range), size=3)
                image_aug = image_aug * colors[None, None, :]
                results["img"] = np.clip(image_aug, 0, 255).astype(np.float32)
            return results

    class HarnessCenterCrop(BaseTransform):
        """Deterministic centre crop of the image and of every map in ``seg_fields`` (fixed views, ``fast``)."""

        def __init__(self, crop_size: Sequence[int]) -> None:
            self.crop_size = (int(crop_size[0]), int(crop_size[1]))

        def transform(self, results: Dict[str, Any]) -> Dict[str, Any]:
            h, w = results["img"].shape[:2]
            ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
            y0, x0 = (h - ch) // 2, (w - cw) // 2
            results["img"] = results["img"][y0:y0 + ch, x0:x0 + cw]
            for key in results.get("seg_fields", []):
                results[key] = results[key][y0:y0 + ch, x0:x0 + cw]
            results["img_shape"] = results["img"].shape[:2]
            return results

    for cls in (HarnessNYUCrop, HarnessDepthColorAug, HarnessCenterCrop):
        TRANSFORMS.register_module(name=cls.__name__, module=cls, force=True)
    _REGISTERED = True


def sample_seed(seed: int, iteration: int, slot: int) -> int:
    """A 32-bit seed for one sample of one iteration (numpy SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(seed), int(iteration), int(slot)]).generate_state(1)[0])


#: a window of a token grid: (rows, columns) slices of the last two axes
Window = Tuple[slice, slice]


def window_size(grid: Sequence[int], fraction: Sequence[float]) -> Tuple[int, int]:
    """Rows and columns of a window that keeps ``fraction`` of each side of ``grid`` (rounded, at least 1)."""
    rows, cols = (min(int(n), max(1, int(round(float(f) * int(n))))) for n, f in zip(grid, fraction))
    return rows, cols


def random_windows(grid: Sequence[int], fraction: Sequence[float], seed: int,
                   items: Sequence[Tuple[int, int, int]]) -> List[Window]:
    """One window of ``window_size(grid, fraction)`` per batch item, placed uniformly at random.

    Each item's offsets come from (seed, iteration, global slot) alone (:func:`sample_seed`), as a faithful
    sample's augmentation does: the windows are the same whether one process or several ranks (each with its
    slice of the global batch, :class:`IterationBatches`) draw them, and a resumed run draws them again.

    Args:
        grid: (rows, columns) of the token grid.
        fraction: the share of rows and of columns each window keeps.
        items: the batch's (iteration, slot, index) triples.
    """
    h, w = window_size(grid, fraction)
    out = []
    for it, slot, _ in items:
        rng = np.random.default_rng(sample_seed(seed, it, slot))
        y, x = (int(v) for v in rng.integers(0, [int(grid[0]) - h + 1, int(grid[1]) - w + 1]))
        out.append((slice(y, y + h), slice(x, x + w)))
    return out


class EpochOrder:
    """Which dataset index fills global position p = iteration·batch + slot: seeded permutation per epoch."""

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n = int(n)
        self.seed = int(seed)
        self._perms: Dict[int, np.ndarray] = {}

    def index(self, position: int) -> int:
        epoch, pos = divmod(int(position), self.n)
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perms[epoch][pos])


class IterationBatches(Sampler):
    """Yields, for iterations ``start..max_iters-1``, the list [(it, slot, index)] of each batch.

    Under torchrun (``dist`` with several ranks) each rank gets its consecutive slice of the *same* global
    batch (rank r: slots r*b .. (r+1)*b-1, b = batch_size / world_size; refused when it does not split): the
    order is seeded by the run seed alone and each sample's augmentation by (seed, iteration, global slot), so
    the ranks together see exactly the batch one process sees.
    """

    def __init__(self, n: int, batch_size: int, start: int, max_iters: int, seed: int,
                 dist: Optional[Dist] = None) -> None:
        self.order = EpochOrder(n, seed)
        self.batch_size = int(batch_size)
        self.start = int(start)
        self.max_iters = int(max_iters)
        self.dist = dist or Dist()
        self.dist.per_rank(self.batch_size)  # a global batch the ranks cannot split is refused here, at once

    def __len__(self) -> int:
        return max(self.max_iters - self.start, 0)

    def __iter__(self) -> Iterator[List[Tuple[int, int, int]]]:
        for it in range(self.start, self.max_iters):
            items = [(it, s, self.order.index(it * self.batch_size + s)) for s in range(self.batch_size)]
            yield self.dist.shard_batch(items)


def to_chw_normalized(img: np.ndarray, mean_255: Sequence[float], std_255: Sequence[float],
                      bgr: bool = True) -> torch.Tensor:
    """HWC image (mmcv loads BGR) -> normalised RGB CHW float tensor (mmseg ``Normalize(to_rgb=True)``)."""
    arr = np.ascontiguousarray(img[..., ::-1] if bgr else img).astype(np.float32)
    t = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(mean_255, dtype=torch.float32)[:, None, None]
    std = torch.tensor(std_255, dtype=torch.float32)[:, None, None]
    return (t - mean) / std


def pad_bottom_right(x: torch.Tensor, size: Tuple[int, int], value: float) -> torch.Tensor:
    """mmcv ``impad`` / mmseg 0.x ``Pad(size)``: pad (..., H, W) at the bottom and right up to ``size``."""
    ph, pw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad {tuple(x.shape[-2:])} to the smaller {size}")
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=value)
    return x


class AugmentedSamples(Dataset):
    """Training samples of an mmseg dataset with per-sample seeded augmentation (see module doc).

    Items are addressed by (iteration, slot, index) triples from :class:`IterationBatches`. Returns
    dict(img=(3,H,W) normalised, target=(H,W) long labels or float depth in metres), padded to ``pad_to``.
    """

    def __init__(self, base: Any, seed: int, mean_255: Sequence[float], std_255: Sequence[float], kind: str,
                 pad_to: Optional[Tuple[int, int]] = None) -> None:
        self.base = base
        self.seed = int(seed)
        self.mean_255, self.std_255 = list(mean_255), list(std_255)
        if kind not in ("seg", "depth"):
            raise ValueError(f"kind must be 'seg' or 'depth', not {kind!r}")
        self.kind = kind
        self.pad_to = pad_to

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int, int]) -> Dict[str, torch.Tensor]:
        it, slot, index = key
        s = sample_seed(self.seed, it, slot)
        np.random.seed(s)
        random.seed(s)
        return convert_sample(self.base[index], self.kind, self.mean_255, self.std_255, self.pad_to)


def convert_sample(results: Dict[str, Any], kind: str, mean_255: Sequence[float], std_255: Sequence[float],
                   pad_to: Optional[Tuple[int, int]] = None) -> Dict[str, torch.Tensor]:
    """mmseg pipeline output (results dict without ``PackSegInputs``) -> tensors."""
    img = to_chw_normalized(results["img"], mean_255, std_255)
    if kind == "seg":
        target = torch.from_numpy(np.ascontiguousarray(results["gt_seg_map"]).astype(np.int64))
        pad_val = float(IGNORE_INDEX)
    else:
        target = torch.from_numpy(np.ascontiguousarray(results["gt_depth_map"]).astype(np.float32))
        pad_val = 0.0
    if pad_to is not None:
        img = pad_bottom_right(img, pad_to, 0.0)  # after Normalize, as mmseg 0.x's Pad: 0 = the mean colour
        target = pad_bottom_right(target[None], pad_to, pad_val)[0]
    return {"img": img, "target": target}


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


# -- pipelines (mmseg 1.x type names) -------------------------------------------------------------


def seg_train_pipeline(aug: Dict[str, Any]) -> List[dict]:
    """DINOv2/DVT "lin." training pipeline (DVT@82704df vitb_{voc2012,ade20k}_linear_config.py), protocol values."""
    return [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations"),
        dict(type="RandomResize", scale=tuple(aug["scale"]), ratio_range=tuple(aug["ratio_range"]), keep_ratio=True),
        dict(type="RandomCrop", crop_size=tuple(aug["crop_size"]), cat_max_ratio=float(aug["cat_max_ratio"])),
        dict(type="RandomFlip", prob=float(aug["flip_prob"])),
    ] + ([dict(type="PhotoMetricDistortion")] if aug.get("photometric", True) else [])


def seg_test_pipeline(scale: Sequence[int]) -> List[dict]:
    """Keep-ratio resize to ``scale`` (2048, 512); labels stay at their original size (mmseg 1.x test order)."""
    return [dict(type="LoadImageFromFile"), dict(type="Resize", scale=tuple(scale), keep_ratio=True),
            dict(type="LoadAnnotations")]


def seg_fixed_view_pipeline(scale: Sequence[int], crop_size: Sequence[int]) -> List[dict]:
    """``fast`` training view: keep-ratio resize to the test scale, centre crop (labels follow)."""
    return [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"),
            dict(type="Resize", scale=tuple(scale), keep_ratio=True),
            dict(type="HarnessCenterCrop", crop_size=tuple(crop_size))]


def depth_train_pipeline(aug: Dict[str, Any]) -> List[dict]:
    """DVT NYU linear training pipeline (DVT@82704df vitb_nyu_linear_config.py), from protocol values."""
    return [
        dict(type="LoadImageFromFile"),
        dict(type="LoadDepthAnnotation", depth_rescale_factor=float(aug["depth_rescale_factor"])),
        dict(type="HarnessNYUCrop", box=tuple(aug["nyu_crop_box"])),
        dict(type="RandomRotate", prob=float(aug["rotate_prob"]), degree=float(aug["rotate_degree"]), pad_val=0,
             seg_pad_val=0),
        dict(type="RandomFlip", prob=float(aug["flip_prob"])),
        dict(type="RandomCrop", crop_size=tuple(aug["crop_size"])),
        dict(type="HarnessDepthColorAug", prob=float(aug["color_prob"]), gamma_range=aug["gamma_range"],
             brightness_range=aug["brightness_range"], color_range=aug["color_range"]),
    ]


def depth_test_pipeline(depth_rescale_factor: float) -> List[dict]:
    """Full 480x640 frames, no resize (DVT ``MultiScaleFlipAug(img_scale=(480, 640))`` on 480x640 input)."""
    return [dict(type="LoadImageFromFile"),
            dict(type="LoadDepthAnnotation", depth_rescale_factor=float(depth_rescale_factor))]


def depth_fixed_view_pipeline(depth_rescale_factor: float, crop_size: Sequence[int],
                              nyu_crop_box: Sequence[int] = NYU_TRAIN_CROP) -> List[dict]:
    """``fast`` training view: NYUCrop (``nyu_crop_box``) then a centre crop of the training crop size."""
    return [dict(type="LoadImageFromFile"),
            dict(type="LoadDepthAnnotation", depth_rescale_factor=float(depth_rescale_factor)),
            dict(type="HarnessNYUCrop", box=tuple(nyu_crop_box)),
            dict(type="HarnessCenterCrop", crop_size=tuple(crop_size))]
