"""mmseg dataset classes that mmsegmentation lacks but the OVSS papers use: VOC20 and COCO-Object.

Why a separate, underscore-named module: these classes subclass ``mmseg.datasets.BaseSegDataset``, so
importing this module imports mmseg and torch. The dataset registry auto-imports every module of
``harness.datasets`` except ``_``-prefixed ones, so keeping them here keeps ``harness list datasets``
and ``harness data verify`` light. :meth:`DatasetSpec.build` imports this module before building.
The classes live at module level so that DataLoader workers can pickle them.

Both are re-implementations of SCLIP's ``custom_datasets.py`` (wangf3014/SCLIP@d84d4ab), the file that
every SCLIP-lineage repository copies (e.g. sinahmr/NACLIP@0cac3a6, mc-lan/ClearCLIP@ad68a40). Class names
and palettes are taken from mmseg's own ``PascalVOCDataset`` / ``COCOStuffDataset`` METAINFO instead of
being retyped, so they cannot drift from the mmseg classes the other datasets use.
"""
from __future__ import annotations

import os.path as osp

from ..compat.mmcv_ops import import_mmseg

import_mmseg()

import mmengine.fileio as fileio  # noqa: E402
from mmseg.datasets import BaseSegDataset, COCOStuffDataset, PascalVOCDataset  # noqa: E402
from mmseg.registry import DATASETS as MMSEG_DATASETS  # noqa: E402


def _register(cls: type) -> type:
    """Register ``cls`` in mmseg's DATASETS, replacing a same-named class (SCLIP's ``custom_datasets.py``
    defines the same names, and its ``COCOObjectDataset`` rejects the suffix arguments the specs pass)."""
    MMSEG_DATASETS.register_module(module=cls, force=True)
    return cls


@_register
class PascalVOC20Dataset(BaseSegDataset):
    """PASCAL VOC 2012 without background: 20 classes, ``reduce_zero_label=True`` (bg -> 255, ignored).

    Same constructor as SCLIP's ``PascalVOC20Dataset``. SCLIP's palette has a typo in its third entry
    (``[0, 0, 192]``); the palette only colours visualisations, so mmseg's VOC palette is used here.
    """

    METAINFO = dict(
        classes=tuple(PascalVOCDataset.METAINFO["classes"][1:]),
        palette=[list(c) for c in PascalVOCDataset.METAINFO["palette"][1:]],
    )

    def __init__(self, ann_file: str, img_suffix: str = ".jpg", seg_map_suffix: str = ".png",
                 reduce_zero_label: bool = True, **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label, ann_file=ann_file, **kwargs)
        assert fileio.exists(self.data_prefix["img_path"], self.backend_args) and osp.isfile(self.ann_file)


@_register
class COCOObjectDataset(BaseSegDataset):
    """COCO-Object: background + the 80 COCO thing classes, labels ``*_instanceTrainIds.png``.

    The label maps come from ``harness data prepare coco_object`` (the GroupViT/SCLIP remap of
    COCO-Stuff-164k, wangf3014/SCLIP@b56bd30 ``datasets/cvt_coco_object.py``): 0 = background (all stuff and
    unlabeled), 1..80 = things in sorted COCO category order, no ignore pixels. SCLIP's class takes no suffix
    arguments; these accept them (with the same defaults) so that the harness can pass its spec's suffixes.
    """

    METAINFO = dict(
        classes=("background",) + tuple(COCOStuffDataset.METAINFO["classes"][:80]),
        palette=[[0, 0, 0]] + [list(c) for c in COCOStuffDataset.METAINFO["palette"][:80]],
    )

    def __init__(self, img_suffix: str = ".jpg", seg_map_suffix: str = "_instanceTrainIds.png",
                 reduce_zero_label: bool = False, **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label, **kwargs)
