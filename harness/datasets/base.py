"""Dataset specs: a registered name bound to an mmseg dataset class, its on-disk layout and counts.

The harness does not re-implement dataset reading: every spec builds the real mmsegmentation dataset
class (``mmseg.datasets``), so file lists, ``reduce_zero_label`` and label maps behave exactly as in
the authors' mmseg-based code. A spec adds what mmseg lacks: the expected image count per split, a
layout check with a readable report (``harness data verify``), and the name file the text side uses.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import DataError
from .safety import check_sample_shapes, checked, screen


@dataclass
class SplitLayout:
    """Where one split lives below the data root (paths relative to the root)."""

    img_dir: str
    ann_dir: str
    count: int  # the official number of images in this split
    ann_file: str = ""  # list of ids, when the mmseg class uses one


class DatasetSpec:
    """Base class of registered datasets. Subclasses set the class attributes below.

    Example (one decorated class in one file)::

        @DATASETS.register("voc21")
        class VOC21(DatasetSpec):
            mmseg_type = "PascalVOCDataset"
            ...
    """

    #: mmseg dataset class name (registered in mmseg's DATASETS registry)
    mmseg_type: str = ""
    #: whether the dataset has label maps (False: label-free evaluators only, e.g. ``folder``)
    labelled: bool = True
    num_classes: int = 0
    reduce_zero_label: bool = False
    img_suffix: str = ".jpg"
    seg_map_suffix: str = ".png"
    #: key of the name file (text side) and of the protocol's per-dataset entry
    key: str = ""
    #: what the data root should be, for messages ("VOCdevkit/VOC2012")
    root_hint: str = ""
    #: how to obtain / prepare the data, for messages
    how_to_get: str = ""
    splits: Dict[str, SplitLayout] = {}
    extra_kwargs: Dict[str, Any] = {}

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", self.key)

    def split(self, split: str) -> SplitLayout:
        if split not in self.splits:
            raise DataError(f"dataset {self.name!r} has no split {split!r}; known: {', '.join(self.splits)}")
        return self.splits[split]

    # -- layout ------------------------------------------------------------------------------
    def verify(self, root: str, split: str = "val", check_count: bool = True) -> List[str]:
        """Return a list of problems with the layout under ``root`` (empty when it is usable)."""
        lay = self.split(split)
        problems: List[str] = []
        if not os.path.isdir(root):
            return [f"data root {root!r} does not exist (expected the {self.name} root, i.e. {self.root_hint})"]
        img_dir = os.path.join(root, lay.img_dir)
        ann_dir = os.path.join(root, lay.ann_dir)
        for d, what in ((img_dir, "images"), (ann_dir, "label maps")):
            if not os.path.isdir(d):
                problems.append(f"missing {what} folder {d}")
        if lay.ann_file and not os.path.isfile(os.path.join(root, lay.ann_file)):
            problems.append(f"missing split file {os.path.join(root, lay.ann_file)}")
        if problems:
            nested = self._nested_root(root, split)
            if nested:
                problems.append(f"{nested} has the expected layout: pass --root {nested}")
            if self.how_to_get:
                problems.append(f"how to get it: {self.how_to_get}")
            return problems
        ids = self.image_ids(root, split)
        if not ids:
            where = os.path.join(root, lay.ann_file) if lay.ann_file else f"{img_dir} (no *{self.img_suffix} files)"
            problems.append(f"no {split} images listed in {where}")
            return problems
        missing_img = [i for i in ids if not os.path.isfile(os.path.join(img_dir, i + self.img_suffix))]
        missing_ann = [i for i in ids if not os.path.isfile(os.path.join(ann_dir, i + self.seg_map_suffix))]
        if missing_img:
            problems.append(f"{len(missing_img)} images missing in {img_dir}, e.g. {missing_img[0]}{self.img_suffix}")
        if missing_ann:
            problems.append(
                f"{len(missing_ann)} label maps missing in {ann_dir}, e.g. {missing_ann[0]}{self.seg_map_suffix}"
                + (f" ({self.how_to_get})" if self.how_to_get else "")
            )
        if check_count and len(ids) != lay.count:
            problems.append(f"found {len(ids)} {split} images, the official {self.name} {split} split has {lay.count}")
        return problems

    def _nested_root(self, root: str, split: str) -> Optional[str]:
        """A folder below ``root`` that has this split's layout (the user passed a parent folder)."""
        lay = self.split(split)
        parts = [p for p in self.root_hint.replace("\\", "/").split("/") if p]
        for k in range(len(parts)):
            cand = os.path.join(root, *parts[k:])
            if os.path.isdir(os.path.join(cand, lay.img_dir)) and os.path.isdir(os.path.join(cand, lay.ann_dir)):
                return cand
        return None

    def image_ids(self, root: str, split: str = "val") -> List[str]:
        """Image ids (file names without suffix, relative to the image folder) of a split."""
        lay = self.split(split)
        if lay.ann_file:
            with open(os.path.join(root, lay.ann_file)) as f:
                return [ln.strip() for ln in f if ln.strip()]
        img_dir = os.path.join(root, lay.img_dir)
        out = []
        for dirpath, _, files in os.walk(img_dir):
            for fn in files:
                if fn.endswith(self.img_suffix):
                    rel = os.path.relpath(os.path.join(dirpath, fn), img_dir)
                    out.append(rel[: -len(self.img_suffix)])
        return sorted(out)

    def check(self, root: str, split: str = "val", check_count: bool = False) -> None:
        """Raise :class:`DataError` listing every problem (used before a run starts)."""
        problems = self.verify(root, split, check_count=check_count)
        if len(problems) == 1:  # one line when there is one problem (an empty folder, a missing label folder)
            raise DataError(f"{self.name} at {root!r} is not usable: {problems[0]}")
        if problems:
            raise DataError(f"{self.name} at {root!r} is not usable:\n  - " + "\n  - ".join(problems))

    # -- per-sample label checks -------------------------------------------------------------
    def check_label_map(self, img_path: str, seg_path: str) -> Tuple[int, int]:
        """Check that ``seg_path`` has the size of ``img_path`` (file headers only); return (H, W).

        Raises :class:`DataError` naming both files and sizes. Why: see :func:`check_sample_shapes`.
        """
        from PIL import Image

        for path, what in ((img_path, "image"), (seg_path, "label map")):
            if not os.path.isfile(path):
                raise DataError(f"{what} {path} does not exist" + (f" ({self.how_to_get})" if self.how_to_get else ""))
        try:
            with Image.open(img_path) as im:
                iw, ih = im.size
            with Image.open(seg_path) as sm:
                sw, sh = sm.size
        except OSError as e:
            raise DataError(f"cannot read {img_path} / {seg_path}: {e} (is the file truncated?)") from e
        check_sample_shapes(img_path, seg_path, (ih, iw), (sh, sw))
        return ih, iw

    def check_label_values(self, seg_path: str, gt_seg_map: Any) -> None:
        """Raise :class:`DataError` when a loaded label map holds ids outside ``0..num_classes-1`` and 255.

        ``gt_seg_map`` is the map *as loaded by mmseg* (after ``reduce_zero_label``). Why: pointing the
        harness at raw label PNGs (e.g. COCO-Stuff ids 0-181 instead of ``*_labelTrainIds.png``) would
        otherwise be scored silently as wrong classes.
        """
        import numpy as np

        arr = np.asarray(gt_seg_map)
        bad = arr[(arr >= self.num_classes) & (arr != 255)]
        if bad.size:
            vals = sorted(int(v) for v in np.unique(bad))[:8]
            raise DataError(
                f"label map {seg_path} contains ids {vals} but {self.name} has {self.num_classes} classes "
                f"(ids 0..{self.num_classes - 1}, 255 = ignore): it is probably a raw or wrongly converted label "
                f"map ({self.how_to_get or 'regenerate the label maps'})"
            )

    # -- mmseg -------------------------------------------------------------------------------
    def mmseg_config(self, root: str, split: str, pipeline: Sequence[dict]) -> Dict[str, Any]:
        lay = self.split(split)
        cfg: Dict[str, Any] = dict(
            type=self.mmseg_type,
            data_root=root,
            data_prefix=dict(img_path=lay.img_dir, seg_map_path=lay.ann_dir),
            img_suffix=self.img_suffix,
            seg_map_suffix=self.seg_map_suffix,
            reduce_zero_label=self.reduce_zero_label,
            pipeline=list(pipeline),
            test_mode=split != "train",
            serialize_data=False,
        )
        if lay.ann_file:
            cfg["ann_file"] = lay.ann_file
        cfg.update(self.extra_kwargs)
        return cfg

    def build(self, root: str, split: str = "val", pipeline: Sequence[dict] = (), limit: Optional[int] = None,
              on_bad_image: str = "fail"):
        """Build the real mmseg dataset for ``split`` under ``root`` (raises :class:`DataError`).

        Every sample is screened first (:func:`harness.datasets.safety.screen`): a bad image or label map
        fails the build naming the file, or with ``on_bad_image="skip"`` is left out and listed in
        ``dataset.harness_skipped``; loading errors later name the sample's files too.
        """
        from ..compat.mmcv_ops import import_mmseg

        import_mmseg()
        from mmseg.registry import DATASETS as MMSEG_DATASETS

        from . import _mmseg_extra  # noqa: F401  (registers our mmseg classes: voc20, coco_object)

        self.check(root, split)
        # Pipelines name transforms as mmseg configs do (dict(type='LoadAnnotations')); without the mmseg
        # default scope mmengine resolves them in the root registry and picks mmcv's LoadAnnotations
        # (which expects detection 'instances'). mmseg's own tools call this before building datasets.
        from mmengine.registry import init_default_scope

        init_default_scope("mmseg")
        cfg = self.mmseg_config(root, split, pipeline)
        if limit:
            cfg["indices"] = int(limit)
        try:
            ds = MMSEG_DATASETS.build(cfg)
        except (AssertionError, FileNotFoundError, OSError) as e:
            raise DataError(f"mmseg could not open {self.name} at {root!r}: {e}") from e
        if len(ds) == 0:
            raise DataError(f"no {split} images found for {self.name} under {root!r} (expected {self.root_hint})")
        screen(self, ds, on_bad_image)
        return checked(self, ds)

    @property
    def class_names(self) -> List[str]:
        """Evaluation class names in label order (from the mmseg class's METAINFO)."""
        from ..compat.mmcv_ops import import_mmseg

        import_mmseg()
        from mmseg.registry import DATASETS as MMSEG_DATASETS

        from . import _mmseg_extra  # noqa: F401

        return list(MMSEG_DATASETS.get(self.mmseg_type).METAINFO["classes"])
