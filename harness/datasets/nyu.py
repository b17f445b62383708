"""NYU Depth v2 for the depth probe: mmseg's ``NYUDataset`` layout, ``prepare_nyu`` and ``verify_nyu``.

Layout (mmseg 1.x ``mmseg/datasets/nyu.py`` and ``tools/dataset_converters/nyu.py``)::

    <root>/images/{train,test}/<scene>_<NNNNN>.jpg
    <root>/annotations/{train,test}/<scene>_<NNNNN>.png     depth in millimetres, 16-bit PNG, 0 = invalid
    <root>/nyu_prepare.json                                 what prepare_nyu wrote (sources, counts)

Sources (probes.md §2.4):

* the official labeled set ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 = HDF5; 1,449 RGB-D frames, 480x640,
  in-painted depth in metres) with the official split ``splits.mat`` (``trainNdxs`` 795 / ``testNdxs`` 654,
  1-based indices into the labeled set). The 654 test frames are the test set of every NYU depth paper.
* optionally the BTS training layout (``sync/<scene>/rgb_XXXXX.jpg`` + ``sync_depth_XXXXX.png`` with the
  split file ``nyudepthv2_train_files_with_gt.txt``, 24,231 lines ``<rgb> <depth> <focal>`` whose paths are
  relative to the ``sync`` folder, BTS's ``data_path``). DINOv2 and DVT train their NYU probes on it; with
  it, ``images/train`` holds the BTS frames (symlinked) instead of the 795.
"""
from __future__ import annotations

import json
import os
import os.path as osp
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError
from ..registry import DATASETS
from .base import DatasetSpec, SplitLayout

#: official labeled-set split sizes (probes.md §2.4: splits.mat, 795 train / 654 test)
NYU_OFFICIAL_TRAIN = 795
NYU_OFFICIAL_TEST = 654
NYU_LABELED_TOTAL = 1449
#: BTS / toolbox nyu_train.txt line count (probes.md §2.4)
NYU_BTS_TRAIN = 24231
#: frame size of the labeled set and of the BTS frames
NYU_FRAME_HW = (480, 640)
#: depth PNGs hold millimetres (``depth_scale=1000``, probes.md §2.3 / §2.6)
DEPTH_SCALE = 1000.0
#: NYU's evaluation range is (0.001, 10) m (probes.md §2.5); a prepared map above this is suspicious
NYU_MAX_DEPTH_M = 10.0
#: JPEG quality of the images extracted from the .mat (the .mat holds raw RGB; high quality keeps them close)
JPEG_QUALITY = 100
#: verify_nyu reads at most this many depth maps per split (every file when the split is smaller)
VERIFY_SAMPLE = 2000

_HOW_TO_GET = ("download nyu_depth_v2_labeled.mat and splits.mat from the NYU Depth V2 page "
               "(cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html) and run "
               "`harness data prepare nyu --mat nyu_depth_v2_labeled.mat --splits splits.mat --out ROOT`")
MANIFEST = "nyu_prepare.json"


@DATASETS.register("nyu")
class NYUDepthV2(DatasetSpec):
    """NYU Depth v2 (depth): test = the official 654 frames; train = official 795 or the BTS 24,231 frames."""

    mmseg_type = "NYUDataset"
    num_classes = 0
    key = "nyu"
    img_suffix = ".jpg"
    seg_map_suffix = ".png"
    root_hint = "a folder with images/{train,test} and annotations/{train,test} (made by `harness data prepare nyu`)"
    how_to_get = _HOW_TO_GET
    splits = {
        "train": SplitLayout("images/train", "annotations/train", NYU_OFFICIAL_TRAIN),
        "test": SplitLayout("images/test", "annotations/test", NYU_OFFICIAL_TEST),
    }

    def mmseg_config(self, root: str, split: str, pipeline: Sequence[dict]) -> Dict[str, Any]:
        """mmseg ``NYUDataset`` takes ``depth_map_path`` / ``depth_map_suffix`` instead of the seg names."""
        lay = self.split(split)
        return dict(type=self.mmseg_type, data_root=root,
                    data_prefix=dict(img_path=lay.img_dir, depth_map_path=lay.ann_dir),
                    img_suffix=self.img_suffix, depth_map_suffix=self.seg_map_suffix, pipeline=list(pipeline),
                    test_mode=split != "train", serialize_data=False)

    @property
    def class_names(self) -> List[str]:
        return []

    def verify(self, root: str, split: str = "test", check_count: bool = True) -> List[str]:
        """Layout check (``check_count=False``, before a run) or the full :func:`verify_nyu_split` check."""
        if not check_count or not osp.isdir(root):
            return super().verify(root, split, check_count=False)
        return verify_nyu_split(root, split)


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


def _read_manifest(root: str) -> Dict[str, Any]:
    path = osp.join(root, MANIFEST)
    if not osp.isfile(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def verify_nyu_split(root: str, split: str, sample: int = VERIFY_SAMPLE) -> List[str]:
    """Problems with one split of a prepared NYU root (see :func:`verify_nyu`)."""
    import cv2

    spec = NYUDepthV2()
    lay = spec.split(split)
    img_dir, ann_dir = osp.join(root, lay.img_dir), osp.join(root, lay.ann_dir)
    if not osp.isdir(img_dir) or not osp.isdir(ann_dir):
        return [f"missing {img_dir} or {ann_dir} ({_HOW_TO_GET})"]
    problems: List[str] = []
    ids = spec.image_ids(root, split)
    missing = [i for i in ids if not osp.isfile(osp.join(ann_dir, i + ".png"))]
    if missing:
        problems.append(f"{len(missing)} {split} images have no depth map in {ann_dir}, e.g. {missing[0]}.png")
    manifest = _read_manifest(root)
    if split == "test":
        expected = [NYU_OFFICIAL_TEST]
    elif manifest.get("train_source") == "bts":
        expected = [int(manifest.get("train", NYU_BTS_TRAIN))]
    else:
        expected = [NYU_OFFICIAL_TRAIN, NYU_BTS_TRAIN]
    if len(ids) not in expected:
        problems.append(f"found {len(ids)} {split} images; expected {' or '.join(map(str, expected))}")
    missing_set = set(missing)
    present = [i for i in ids if i not in missing_set]
    step = max(1, len(present) // max(1, sample))
    for i in present[::step][:sample]:
        p = osp.join(ann_dir, i + ".png")
        d = cv2.imread(p, cv2.IMREAD_UNCHANGED)
        if d is None:
            problems.append(f"cannot read depth map {p}")
            continue
        if d.dtype != np.uint16 or d.ndim != 2:
            problems.append(f"{p} is {d.dtype} with shape {d.shape}; expected a single-channel 16-bit PNG "
                            f"in millimetres")
            continue
        if tuple(d.shape) != NYU_FRAME_HW:
            problems.append(f"{p} is {d.shape[0]}x{d.shape[1]}; NYU frames are 480x640")
        valid = d[d > 0]
        if valid.size == 0:
            problems.append(f"{p} has no valid (non-zero) depth")
        elif float(valid.max()) / DEPTH_SCALE > NYU_MAX_DEPTH_M * 1.05:
            problems.append(f"{p} reaches {valid.max() / DEPTH_SCALE:.1f} m (> 10 m): not NYU millimetres?")
        elif float(valid.max()) < 100:
            problems.append(f"{p} peaks at {valid.max()} -- depth looks stored in metres, not millimetres")
        if len(problems) > 20:
            problems.append("... (stopping after 20 problems)")
            break
    return problems


def verify_nyu(root: str, sample: int = VERIFY_SAMPLE) -> List[str]:
    """Problems with a prepared NYU root (empty list = usable and complete).

    Checks: folders exist; every image has its depth PNG; counts (test 654; train 795, or the BTS count
    recorded by ``prepare_nyu``, normally 24,231); depth PNGs are single-channel 16-bit millimetres with
    values in (0, 10 m] and some valid pixels; frames are 480x640. At most ``sample`` maps per split are
    read (evenly spaced) to keep the check fast; the counts always cover every file.
    """
    if not osp.isdir(root):
        return [f"NYU root {root!r} does not exist ({_HOW_TO_GET})"]
    return verify_nyu_split(root, "train", sample) + verify_nyu_split(root, "test", sample)


# ---------------------------------------------------------------------------------------------
# synthetic files for tests and the demo
# ---------------------------------------------------------------------------------------------
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
