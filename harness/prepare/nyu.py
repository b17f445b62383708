"""NYU Depth v2 preparation: the official ``.mat`` files (and optionally the BTS layout) -> mmseg's layout.

The layout, the sources and the checks of the result are described in :mod:`harness.datasets.nyu`
(with their public sources); ``harness data prepare nyu`` calls :func:`prepare_nyu`. h5py, scipy and cv2 are
imported where they are needed.
"""
from __future__ import annotations

import json
import os
import os.path as osp
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..datasets.nyu import DEPTH_SCALE, MANIFEST, NYUDepthV2
from ..errors import DataError

#: JPEG quality of the images extracted from the .mat (the .mat holds raw RGB; high quality keeps them close)
JPEG_QUALITY = 100

#: the fix named by every "file missing / unreadable" error: the spec's own hint, so both say the same
_HOW_TO_GET = NYUDepthV2.how_to_get


# ---------------------------------------------------------------------------------------------
# reading the official files
# ---------------------------------------------------------------------------------------------
def _open_labeled_mat(mat_path: str):
    import h5py

    if not osp.isfile(mat_path):
        raise DataError(f"NYU labeled file {mat_path} does not exist ({_HOW_TO_GET})")
    try:
        f = h5py.File(mat_path, "r")
    except OSError as e:
        raise DataError(f"{mat_path} is not a MATLAB v7.3 (HDF5) file ({e}); the official "
                        f"nyu_depth_v2_labeled.mat is one -- is the download truncated?") from e
    for key in ("images", "depths"):
        if key not in f:
            f.close()
            raise DataError(f"{mat_path} has no '{key}' dataset; expected the official nyu_depth_v2_labeled.mat "
                            f"(datasets images, depths, ...)")
    return f


def _mat_string(f: Any, ref: Any) -> str:
    """A MATLAB char array referenced from a v7.3 cell array -> str."""
    return "".join(chr(int(c)) for c in np.asarray(f[ref]).ravel())


def _scene_names(f: Any, n: int) -> List[str]:
    """Per-frame scene names (``scenes`` cell array), or ``scene`` when the file has none."""
    if "scenes" not in f:
        return ["scene"] * n
    refs = np.asarray(f["scenes"]).ravel()
    if len(refs) != n:
        raise DataError(f"the .mat lists {len(refs)} scene names for {n} frames; is it the official labeled file?")
    names = []
    for r in refs:
        s = _mat_string(f, r).strip().replace("/", "_").replace(" ", "_")
        names.append(s or "scene")
    return names


def read_splits(splits_path: str, n: int) -> Tuple[List[int], List[int]]:
    """0-based (train, test) indices from the official ``splits.mat`` (1-based ``trainNdxs`` / ``testNdxs``).

    Accepts MATLAB v5 (the official file; read with scipy) and v7.3 (HDF5).
    """
    if not osp.isfile(splits_path):
        raise DataError(f"--splits {splits_path}: no such file ({_HOW_TO_GET})")
    data: Dict[str, np.ndarray] = {}
    try:
        import scipy.io

        raw = scipy.io.loadmat(splits_path)
        data = {k: np.asarray(v) for k, v in raw.items() if not k.startswith("__")}
    except NotImplementedError:  # v7.3
        import h5py

        with h5py.File(splits_path, "r") as f:
            data = {k: np.asarray(f[k]) for k in f.keys()}
    except (ValueError, OSError) as e:
        raise DataError(f"--splits {splits_path} is not a readable .mat file ({e})") from e
    missing = [k for k in ("trainNdxs", "testNdxs") if k not in data]
    if missing:
        raise DataError(f"--splits {splits_path} lacks {', '.join(missing)}; pass the official NYU splits.mat")
    train = [int(i) - 1 for i in data["trainNdxs"].ravel()]
    test = [int(i) - 1 for i in data["testNdxs"].ravel()]
    bad = [i for i in train + test if not 0 <= i < n]
    if bad:
        raise DataError(f"--splits {splits_path} has indices outside 1..{n} (e.g. {bad[0] + 1}); it does not "
                        f"belong to this labeled file")
    if set(train) & set(test):
        raise DataError(f"--splits {splits_path}: train and test share frames")
    return train, test


def _frame(f: Any, i: int) -> Tuple[np.ndarray, np.ndarray]:
    """Frame i as (H, W, 3) uint8 RGB and (H, W) float depth in metres (MATLAB stores them transposed)."""
    img = np.asarray(f["images"][i]).transpose(2, 1, 0)
    depth = np.asarray(f["depths"][i]).T
    return np.ascontiguousarray(img), np.ascontiguousarray(depth)


def depth_to_png_mm(depth_m: np.ndarray) -> np.ndarray:
    """Metres -> uint16 millimetres (rounded; NaN and negatives -> 0 = invalid)."""
    d = np.nan_to_num(np.asarray(depth_m, dtype=np.float64), nan=0.0)
    return np.clip(np.rint(d * DEPTH_SCALE), 0, 65535).astype(np.uint16)


def _write_frame(out_root: str, split: str, name: str, rgb: np.ndarray, depth_mm: np.ndarray) -> None:
    import cv2

    img_p = osp.join(out_root, "images", split, name + ".jpg")
    dep_p = osp.join(out_root, "annotations", split, name + ".png")
    if not cv2.imwrite(img_p, np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise DataError(f"could not write {img_p} (disk full or not writable?)")
    if not cv2.imwrite(dep_p, depth_mm):
        raise DataError(f"could not write {dep_p} (disk full or not writable?)")


def read_bts_split(bts_root: str, split_file: str) -> List[Tuple[str, str]]:
    """(rgb, depth) absolute paths from a BTS split file (``<rgb> <depth> <focal>`` per line)."""
    if not osp.isfile(split_file):
        raise DataError(f"--bts-split {split_file}: no such file (BTS train_test_inputs/"
                        f"nyudepthv2_train_files_with_gt.txt)")
    pairs = []
    with open(split_file) as fh:
        for ln, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2 or parts[1] == "None":
                raise DataError(f"{split_file}:{ln}: expected '<rgb> <depth> <focal>', got {line.strip()!r}")
            pairs.append((osp.join(bts_root, parts[0].lstrip("/")), osp.join(bts_root, parts[1].lstrip("/"))))
    if not pairs:
        raise DataError(f"{split_file} lists no frames")
    missing = [p for pair in pairs for p in pair if not osp.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} files of {split_file} are missing under --bts-root {bts_root}, "
                        f"e.g. {missing[0]} (the BTS 'sync' folder must be below the root)")
    return pairs


def bts_name(rgb_rel: str) -> str:
    """mmseg converter naming (tools/dataset_converters/nyu.py): ``/kitchen_0028b/rgb_00045.jpg`` ->
    ``kitchen_0028b_00045``."""
    rel = rgb_rel.strip().strip("/").replace("/rgb", "")
    return osp.splitext(rel.replace("/", "_"))[0]


def _place(src: str, dst: str, copy: bool) -> None:
    if osp.lexists(dst):
        os.remove(dst)
    if copy:
        shutil.copyfile(src, dst)
    else:
        os.symlink(osp.abspath(src), dst)


def prepare_nyu(mat_path: str, out_root: str, splits_path: Optional[str] = None, bts_root: Optional[str] = None,
                bts_split: Optional[str] = None, copy: bool = False) -> Dict[str, Any]:
    """Write the mmseg ``NYUDataset`` layout under ``out_root``; return a summary dict.

    Args:
        mat_path: the official ``nyu_depth_v2_labeled.mat``.
        out_root: output folder (``images/{train,test}``, ``annotations/{train,test}``, a manifest).
        splits_path: the official ``splits.mat``; default: ``splits.mat`` next to ``mat_path``.
        bts_root, bts_split: optional BTS training layout and its split file; the BTS frames then form
            ``train`` (the official 654 stay ``test``). The BTS files are symlinked unless ``copy``.
        copy: copy the BTS files instead of symlinking them.
    """
    if splits_path is None:
        splits_path = osp.join(osp.dirname(osp.abspath(mat_path)), "splits.mat")
        if not osp.isfile(splits_path):
            raise DataError(f"no splits.mat next to {mat_path}; pass --splits FILE (the official NYU splits.mat "
                            f"with trainNdxs/testNdxs, 795/654)")
    if (bts_root is None) != (bts_split is None):
        raise DataError("pass both --bts-root and --bts-split (BTS sync folder and nyudepthv2_train_files_with_gt.txt)")
    bts_pairs = read_bts_split(bts_root, bts_split) if bts_root else []
    with _open_labeled_mat(mat_path) as f:
        n = int(f["images"].shape[0])
        train_idx, test_idx = read_splits(splits_path, n)
        scenes = _scene_names(f, n)
        for split in ("train", "test"):
            for sub in ("images", "annotations"):
                d = osp.join(out_root, sub, split)
                if osp.isdir(d):
                    shutil.rmtree(d)  # a re-run must not mix old and new frames
                os.makedirs(d)
        written = {"train": 0, "test": 0}
        depth_max = 0.0
        jobs = [("test", i) for i in test_idx] + ([] if bts_pairs else [("train", i) for i in train_idx])
        for split, i in jobs:
            rgb, depth = _frame(f, i)
            if rgb.shape[:2] != depth.shape or rgb.ndim != 3:
                raise DataError(f"{mat_path}: frame {i + 1} has image {rgb.shape} and depth {depth.shape}")
            mm = depth_to_png_mm(depth)
            depth_max = max(depth_max, float(mm.max()) / DEPTH_SCALE)
            _write_frame(out_root, split, f"{scenes[i]}_{i + 1:05d}", rgb, mm)
            written[split] += 1
    for rgb_p, dep_p in bts_pairs:
        name = bts_name(osp.relpath(rgb_p, bts_root))  # type: ignore[arg-type]
        _place(rgb_p, osp.join(out_root, "images", "train", name + ".jpg"), copy)
        _place(dep_p, osp.join(out_root, "annotations", "train", name + ".png"), copy)
        written["train"] += 1
    summary = {"out_root": osp.abspath(out_root), "train": written["train"], "test": written["test"],
               "train_source": "bts" if bts_pairs else "official", "test_source": "official",
               "mat": osp.abspath(mat_path), "splits": osp.abspath(splits_path),
               "bts_split": osp.abspath(bts_split) if bts_split else None, "max_depth_m_written": depth_max,
               "depth_png": "uint16 millimetres, 0 = invalid"}
    with open(osp.join(out_root, MANIFEST), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary
