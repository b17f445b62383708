"""A small synthetic NYU Depth v2 download (``nyu_depth_v2_labeled.mat`` + ``splits.mat``) for tests.

Why: :func:`harness.prepare.nyu.prepare_nyu` and the depth probe must run without the multi-GB official
file. The writer reproduces the official file's HDF5 layout (MATLAB v7.3, transposed arrays, scene names
as a cell array of char arrays) so the preparation reads it exactly as it reads the real one.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Tuple

import numpy as np

from ..datasets.nyu import NYU_FRAME_HW


def depth_colour(depth_m: np.ndarray) -> np.ndarray:
    """The synthetic frames' colour code: depth 1..8 m -> hue 0..0.75 (red to violet), fixed saturation/value.

    A hue (a direction in RGB space) survives the per-token LayerNorm of a ViT, so a probe on even a random
    backbone's features can read depth back.
    """
    t = np.clip((np.asarray(depth_m, dtype=np.float64) - 1.0) / 7.0, 0.0, 1.0)
    hue, sat, val = 0.75 * t, 0.85, 0.9
    # vectorised colorsys.hsv_to_rgb
    i = np.floor(hue * 6.0)
    f = hue * 6.0 - i
    p, q, r = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    i = i.astype(int) % 6
    rgb = np.select([i[..., None] == k for k in range(6)],
                    [np.stack(c, -1) for c in ((val + 0 * t, r, p + 0 * t), (q, val + 0 * t, p + 0 * t),
                                               (p + 0 * t, val + 0 * t, r), (p + 0 * t, q, val + 0 * t),
                                               (r, p + 0 * t, val + 0 * t), (val + 0 * t, p + 0 * t, q))])
    return rgb * 255.0


def _synthetic_frame(rng: np.random.Generator, hw: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Colour-coded depth (:func:`depth_colour`): a wall from 2 m (top) to 5 m (bottom) and 2-4 rectangles
    at random depths in 1-8 m, plus pixel noise."""
    h, w = hw
    depth = np.repeat(2.0 + 3.0 * np.arange(h, dtype=np.float64)[:, None] / h, w, axis=1)
    for _ in range(int(rng.integers(2, 5))):
        rh, rw = int(rng.integers(h // 5, h // 2)), int(rng.integers(w // 5, w // 2))
        y0, x0 = int(rng.integers(0, h - rh)), int(rng.integers(0, w - rw))
        depth[y0:y0 + rh, x0:x0 + rw] = rng.uniform(1.0, 8.0)
    rows = depth_colour(depth[:, :1])  # the wall varies by row only: colour it row-wise, then paint the boxes
    img = np.repeat(rows, w, axis=1)
    boxes = depth != depth[:, :1]
    if boxes.any():
        img[boxes] = depth_colour(depth[boxes])
    img += rng.normal(0, 3, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), depth.astype(np.float32)


def write_synthetic_nyu(out_dir: str, num_train: int = 8, num_test: int = 4, seed: int = 0,
                        hw: Tuple[int, int] = NYU_FRAME_HW) -> Tuple[str, str]:
    """A small ``nyu_depth_v2_labeled.mat`` (v7.3/HDF5 layout, transposed like MATLAB) and ``splits.mat``.

    Returns (mat_path, splits_path). Frames get scene names ``kitchen_0001``, ``office_0002``, ...
    stored as a MATLAB cell array of char arrays (object references), as in the official file.
    """
    import h5py
    import scipy.io

    os.makedirs(out_dir, exist_ok=True)
    n = num_train + num_test
    rng = np.random.default_rng(seed)
    mat_path = osp.join(out_dir, "nyu_depth_v2_labeled.mat")
    with h5py.File(mat_path, "w") as f:
        images = f.create_dataset("images", shape=(n, 3, hw[1], hw[0]), dtype=np.uint8)
        depths = f.create_dataset("depths", shape=(n, hw[1], hw[0]), dtype=np.float32)
        refs_grp = f.create_group("#refs#")
        refs = []
        for i in range(n):
            img, depth = _synthetic_frame(rng, hw)
            images[i] = img.transpose(2, 1, 0)
            depths[i] = depth.T
            name = f"{('kitchen', 'office', 'bedroom')[i % 3]}_{i + 1:04d}"
            ds = refs_grp.create_dataset(f"s{i}", data=np.array([[ord(c)] for c in name], dtype=np.uint16))
            refs.append(ds.ref)
        f.create_dataset("scenes", data=np.array([refs], dtype=h5py.ref_dtype))
    order = rng.permutation(n) + 1
    splits_path = osp.join(out_dir, "splits.mat")
    scipy.io.savemat(splits_path, {"trainNdxs": np.sort(order[:num_train]).reshape(-1, 1).astype(np.float64),
                                   "testNdxs": np.sort(order[num_train:]).reshape(-1, 1).astype(np.float64)})
    return mat_path, splits_path
