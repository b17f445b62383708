"""NYU Depth v2 for the depth probe: the registered spec (mmseg's ``NYUDataset`` layout) and ``verify_nyu``.

Layout (mmseg 1.x ``mmseg/datasets/nyu.py`` and ``tools/dataset_converters/nyu.py``)::

    <root>/images/{train,test}/<scene>_<NNNNN>.jpg
    <root>/annotations/{train,test}/<scene>_<NNNNN>.png     depth in millimetres, 16-bit PNG, 0 = invalid
    <root>/nyu_prepare.json                                 what prepare_nyu wrote (sources, counts)

Sources (Silberman et al., ECCV 2012, for the labeled set; Lee et al., BTS, arXiv:1907.10326, for the split files):

* the official labeled set ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 = HDF5; 1,449 RGB-D frames, 480x640,
  in-painted depth in metres) with the official split ``splits.mat`` (``trainNdxs`` 795 / ``testNdxs`` 654,
  1-based indices into the labeled set). The 654 test frames are the test set of every NYU depth paper.
* optionally the BTS training layout (``sync/<scene>/rgb_XXXXX.jpg`` + ``sync_depth_XXXXX.png`` with the
  split file ``nyudepthv2_train_files_with_gt.txt``, 24,231 lines ``<rgb> <depth> <focal>`` whose paths are
  relative to the ``sync`` folder, BTS's ``data_path``). DINOv2 and DVT train their NYU probes on it; with
  it, ``images/train`` holds the BTS frames (symlinked) instead of the 795.

Building the layout from those files is :func:`harness.prepare.nyu.prepare_nyu`; a small synthetic
``.mat`` pair for tests is :func:`harness.synthetic.nyu.write_synthetic_nyu`. Both live outside
``harness/datasets`` so that a registry lookup never imports them. The checks of a prepared root stay
here because :meth:`NYUDepthV2.verify` (``harness data verify nyu``) runs them.
"""
from __future__ import annotations

import json
import os.path as osp
from typing import Any, Dict, List, Sequence

import numpy as np

from ..registry import DATASETS
from .base import DatasetSpec, SplitLayout

#: official labeled-set split sizes (splits.mat of the NYU Depth v2 release: 795 train / 654 test)
NYU_OFFICIAL_TRAIN = 795
NYU_OFFICIAL_TEST = 654
NYU_LABELED_TOTAL = 1449
#: BTS / toolbox nyu_train.txt line count (zhyever/Monocular-Depth-Estimation-Toolbox@d8aff50e splits/nyu_train.txt)
NYU_BTS_TRAIN = 24231
#: frame size of the labeled set and of the BTS frames
NYU_FRAME_HW = (480, 640)
#: depth PNGs hold millimetres (``depth_scale=1000``, DVT@82704df evaluation/configs/vitb_nyu_linear_config.py)
DEPTH_SCALE = 1000.0
#: NYU's evaluation range is (0.001, 10) m (same config: min_depth/max_depth); a prepared map above this is suspicious
NYU_MAX_DEPTH_M = 10.0
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
# checks of a prepared root (``harness data verify nyu``)
# ---------------------------------------------------------------------------------------------
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
