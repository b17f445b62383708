"""Tiny synthetic datasets in the *real* on-disk layouts, for tests, CI smoke runs and ``harness demo``.

Why: every code path from ``DATASETS.get(name).build(root)`` to the metric must be testable without
the real archives (tens of GB). The writers reproduce each dataset's folder layout, file naming and
*raw* label convention (VOC palette PNGs with 255 borders, ADE 0 = "other", Cityscapes
``labelTrainIds`` with 255 void, raw COCO-Stuff ids with 255 unlabeled, ...), so the mmseg classes
and ``reduce_zero_label`` handling run exactly as on real data.

Images are colour-coded: every raw label id has a fixed, distinct colour (plus noise), so a model
can in principle recover the classes from the pixels. Images are small, non-square and of varied
sizes. Everything is deterministic in ``seed``.
"""
from __future__ import annotations

import colorsys
import json
import os
import os.path as osp
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from ..errors import DataError
from ..prepare.labels import (
    COCO_LAST_THING_ID,
    COCO_STUFF_UNUSED_IDS,
    CONTEXT_MAPPING,
    remap_coco_object,
    remap_coco_stuff,
)

Size = Tuple[int, int]

#: colour of void / unlabeled regions (raw 255) in the synthetic images
_VOID_COLOUR = (118, 118, 118)
_SPLIT_CODE = {"val": 0, "train": 1}


def class_colour(raw_id: int) -> Tuple[int, int, int]:
    """Fixed, well-separated RGB colour of a raw label id (golden-ratio hues, 3 brightness levels)."""
    if raw_id == 255:
        return _VOID_COLOUR
    hue = (raw_id * 0.618033988749895) % 1.0
    sat = (0.95, 0.6, 0.8)[raw_id % 3]
    val = (0.95, 0.75, 0.55)[(raw_id // 3) % 3]
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


def voc_palette() -> List[int]:
    """The 256-entry PASCAL VOC colour map (VOCdevkit ``VOClabelcolormap.m`` bit-interleaving), flat RGB."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


# ---------------------------------------------------------------------------------------------
# per-image content
# ---------------------------------------------------------------------------------------------
def _image_size(rng: np.random.Generator, size: Size) -> Size:
    """A varied, non-square size around ``size`` (H, W)."""
    H, W = size
    for _ in range(100):
        h = max(32, int(round(H * rng.uniform(0.8, 1.25))))
        w = max(32, int(round(W * rng.uniform(0.8, 1.25))))
        if h != w:
            return h, w
    return H, W + 1 if H == W else W


def _paint_regions(rng: np.random.Generator, h: int, w: int, fill: int, objects: Sequence[int]) -> np.ndarray:
    """Label map: ``fill`` everywhere, then one rectangle or ellipse per id in ``objects`` (later on top)."""
    lab = np.full((h, w), fill, dtype=np.int32)
    yy, xx = np.mgrid[0:h, 0:w]
    for c in objects:
        rh = int(rng.integers(max(4, h // 5), max(5, h // 2)))
        rw = int(rng.integers(max(4, w // 5), max(5, w // 2)))
        y0 = int(rng.integers(0, h - rh + 1))
        x0 = int(rng.integers(0, w - rw + 1))
        if rng.random() < 0.5:
            lab[y0:y0 + rh, x0:x0 + rw] = c
        else:
            cy, cx = y0 + rh / 2.0, x0 + rw / 2.0
            inside = ((yy + 0.5 - cy) / (rh / 2.0)) ** 2 + ((xx + 0.5 - cx) / (rw / 2.0)) ** 2 <= 1.0
            lab[inside] = c
    return lab


def _render(rng: np.random.Generator, regions: np.ndarray) -> np.ndarray:
    """RGB uint8 image: each region id's colour, a per-image brightness shift and pixel noise."""
    ids = np.unique(regions)
    lut = np.zeros((int(ids.max()) + 1, 3), dtype=np.float32)
    for i in ids:
        lut[int(i)] = class_colour(int(i))
    img = lut[regions] + rng.normal(0.0, 6.0, size=regions.shape + (3,)) + rng.uniform(-10, 10)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _boundary(lab: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels within ``width`` of a label change (VOC marks object outlines 255)."""
    edge = np.zeros(lab.shape, dtype=bool)
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[1:, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:, 1:] |= lab[:, :-1] != lab[:, 1:]
    out = edge.copy()
    for _ in range(width - 1):
        grown = out.copy()
        grown[:-1, :] |= out[1:, :]
        grown[1:, :] |= out[:-1, :]
        grown[:, :-1] |= out[:, 1:]
        grown[:, 1:] |= out[:, :-1]
        out = grown
    return out


@dataclass
class _Sample:
    image: np.ndarray  # H, W, 3 RGB
    label: np.ndarray  # H, W uint8, raw label convention of the dataset


def _voc_sample(rng: np.random.Generator, size: Size, classes: Sequence[int] = tuple(range(1, 21))) -> _Sample:
    h, w = _image_size(rng, size)
    objects = rng.choice(classes, size=int(rng.integers(1, min(3, len(classes)) + 1)), replace=False)
    regions = _paint_regions(rng, h, w, 0, [int(c) for c in objects])
    label = regions.astype(np.uint8)
    label[_boundary(regions)] = 255  # VOC: 255 outlines around objects
    return _Sample(_render(rng, regions), label)


def _context_sample(rng: np.random.Generator, size: Size) -> _Sample:
    h, w = _image_size(rng, size)
    fill = int(rng.integers(1, 60)) if rng.random() < 0.7 else 0
    objects = rng.choice(np.arange(1, 60), size=int(rng.integers(2, 5)), replace=False)
    regions = _paint_regions(rng, h, w, fill, [0] + [int(c) for c in objects])  # always some background (0)
    return _Sample(_render(rng, regions), regions.astype(np.uint8))


_COCO_USED = [i for i in range(182) if i not in COCO_STUFF_UNUSED_IDS]
_COCO_THINGS = [i for i in _COCO_USED if i <= COCO_LAST_THING_ID]
_COCO_STUFF = [i for i in _COCO_USED if i > COCO_LAST_THING_ID]


def _coco_raw_sample(rng: np.random.Generator, size: Size) -> _Sample:
    h, w = _image_size(rng, size)
    fill = int(rng.choice(_COCO_STUFF))
    objects = [int(c) for c in rng.choice(_COCO_THINGS, size=int(rng.integers(1, 4)), replace=False)]
    objects += [int(rng.choice(_COCO_STUFF)), 255]  # another stuff region and an unlabeled (255) region
    rng.shuffle(objects)
    regions = _paint_regions(rng, h, w, fill, objects)
    return _Sample(_render(rng, regions), regions.astype(np.uint8))


def _cityscapes_sample(rng: np.random.Generator, size: Size) -> _Sample:
    h, w = _image_size(rng, size)
    regions = np.full((h, w), 0, dtype=np.int32)  # road
    regions[: h // 3] = 10  # sky
    regions[h // 3: h // 2] = 2  # building
    objs = _paint_regions(rng, h, w, -1, [int(c) for c in rng.choice(19, size=int(rng.integers(2, 5)), replace=False)])
    regions[objs >= 0] = objs[objs >= 0]
    regions[h - max(2, h // 10):] = 255  # ego vehicle / void rows, as in real gtFine
    return _Sample(_render(rng, regions), regions.astype(np.uint8))


def _ade_sample(rng: np.random.Generator, size: Size) -> _Sample:
    h, w = _image_size(rng, size)
    fill = int(rng.integers(1, 151))
    objects = [int(c) for c in rng.choice(np.arange(1, 151), size=int(rng.integers(2, 5)), replace=False)] + [0]
    regions = _paint_regions(rng, h, w, fill, objects)  # 0 = "other" (ignored after reduce_zero_label)
    return _Sample(_render(rng, regions), regions.astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# writers per layout
# ---------------------------------------------------------------------------------------------
def _rng(seed: int, family: str, split: str, i: int) -> np.random.Generator:
    fam = sum(ord(ch) * (k + 1) for k, ch in enumerate(family))
    return np.random.default_rng([int(seed), fam, _SPLIT_CODE.get(split, 7), int(i)])


def _save_jpg(path: str, rgb: np.ndarray) -> None:
    os.makedirs(osp.dirname(path), exist_ok=True)
    Image.fromarray(rgb).save(path, "JPEG", quality=95)


def _save_png(path: str, arr: np.ndarray) -> None:
    os.makedirs(osp.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, "PNG")


def _save_palette_png(path: str, label: np.ndarray) -> None:
    os.makedirs(osp.dirname(path), exist_ok=True)
    im = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label, dtype=np.uint8).tobytes())
    im.putpalette(voc_palette())
    im.save(path, "PNG")


def _write_list(path: str, ids: Sequence[str]) -> None:
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(i + "\n" for i in ids)


def _voc_ids(split: str, n: int) -> List[str]:
    return [f"{2012 if split == 'val' else 2011}_{i:06d}" for i in range(n)]


def _write_voc(root: str, n: int, size: Size, seed: int, split: str,
               classes: Sequence[int] = tuple(range(1, 21)), family: str = "voc") -> str:
    data_root = osp.join(root, "VOCdevkit", "VOC2012")
    ids = _voc_ids(split, n)
    for i, id_ in enumerate(ids):
        s = _voc_sample(_rng(seed, family, split, i), size, classes)
        _save_jpg(osp.join(data_root, "JPEGImages", id_ + ".jpg"), s.image)
        _save_palette_png(osp.join(data_root, "SegmentationClass", id_ + ".png"), s.label)
    _write_list(osp.join(data_root, "ImageSets", "Segmentation", f"{split}.txt"), ids)
    return data_root


def _context_ids(split: str, n: int) -> List[str]:
    return [f"{2010 if split == 'val' else 2009}_{i:06d}" for i in range(n)]


def _write_context(root: str, n: int, size: Size, seed: int, split: str) -> str:
    data_root = osp.join(root, "VOCdevkit", "VOC2010")
    ids = _context_ids(split, n)
    for i, id_ in enumerate(ids):
        s = _context_sample(_rng(seed, "context", split, i), size)
        _save_jpg(osp.join(data_root, "JPEGImages", id_ + ".jpg"), s.image)
        _save_png(osp.join(data_root, "SegmentationClassContext", id_ + ".png"), s.label)
    _write_list(osp.join(data_root, "ImageSets", "SegmentationContext", f"{split}.txt"), ids)
    return data_root


def _coco_ids(split: str, n: int) -> List[str]:
    base = 139 if split == "val" else 9
    return [f"{base + 1000 * i:012d}" for i in range(n)]


def _write_coco(root: str, n: int, size: Size, seed: int, split: str, prepared: bool) -> str:
    data_root = osp.join(root, "coco_stuff164k")
    folder = f"{split}2017"
    for i, id_ in enumerate(_coco_ids(split, n)):
        s = _coco_raw_sample(_rng(seed, "coco", split, i), size)
        _save_jpg(osp.join(data_root, "images", folder, id_ + ".jpg"), s.image)
        ann = osp.join(data_root, "annotations", folder)
        _save_png(osp.join(ann, id_ + ".png"), s.label)  # raw stuffthingmaps PNG
        if prepared:
            _save_png(osp.join(ann, id_ + "_labelTrainIds.png"), remap_coco_stuff(s.label))
            _save_png(osp.join(ann, id_ + "_instanceTrainIds.png"), remap_coco_object(s.label))
    return data_root


_CITIES = {"val": ("frankfurt", "lindau", "munster"), "train": ("aachen", "bochum", "bremen")}


def _write_cityscapes(root: str, n: int, size: Size, seed: int, split: str) -> str:
    data_root = osp.join(root, "cityscapes")
    for i in range(n):
        city = _CITIES[split][i % len(_CITIES[split])]
        stem = f"{city}_{i:06d}_{19 + i:06d}"
        s = _cityscapes_sample(_rng(seed, "cityscapes", split, i), size)
        _save_png(osp.join(data_root, "leftImg8bit", split, city, stem + "_leftImg8bit.png"), s.image)
        _save_png(osp.join(data_root, "gtFine", split, city, stem + "_gtFine_labelTrainIds.png"), s.label)
    return data_root


def _write_ade(root: str, n: int, size: Size, seed: int, split: str) -> str:
    data_root = osp.join(root, "ADEChallengeData2016")
    folder, tag = ("validation", "val") if split == "val" else ("training", "train")
    for i in range(n):
        stem = f"ADE_{tag}_{i + 1:08d}"
        s = _ade_sample(_rng(seed, "ade", split, i), size)
        _save_jpg(osp.join(data_root, "images", folder, stem + ".jpg"), s.image)
        _save_png(osp.join(data_root, "annotations", folder, stem + ".png"), s.label)
    return data_root


_WRITERS: Dict[str, Callable[..., str]] = {
    "voc21": lambda root, n, size, seed, split, prepared: _write_voc(root, n, size, seed, split),
    "voc20": lambda root, n, size, seed, split, prepared: _write_voc(root, n, size, seed, split),
    "context60": lambda root, n, size, seed, split, prepared: _write_context(root, n, size, seed, split),
    "context59": lambda root, n, size, seed, split, prepared: _write_context(root, n, size, seed, split),
    "coco_object": _write_coco,
    "coco_stuff164k": _write_coco,
    "cityscapes": lambda root, n, size, seed, split, prepared: _write_cityscapes(root, n, size, seed, split),
    "ade20k": lambda root, n, size, seed, split, prepared: _write_ade(root, n, size, seed, split),
}
_ALIASES = {"coco_stuff": "coco_stuff164k"}
#: names the writer supports (the 8 OVSS datasets)
SYNTHETIC_NAMES: Tuple[str, ...] = tuple(_WRITERS)


def write_synthetic_dataset(name: str, root: str, num_images: int = 4, size: Size = (120, 160), seed: int = 0,
                            split: str = "val", prepared: bool = True) -> str:
    """Write a tiny ``name`` dataset under ``root`` in its real layout; return the data root to pass.

    Args:
        name: a registered dataset name (``voc21``, ``voc20``, ``context60``, ``context59``,
            ``coco_object``, ``coco_stuff164k``, ``cityscapes``, ``ade20k``).
        root: parent folder; e.g. VOC is written to ``root/VOCdevkit/VOC2012``.
        num_images: images in the split.
        size: nominal (H, W); every image gets its own non-square size within about +-25%.
        seed: all content is a function of (seed, dataset family, split, index).
        split: ``val`` or ``train`` (must be a split of the registered dataset).
        prepared: COCO only: also write the converted ``*_labelTrainIds.png`` / ``*_instanceTrainIds.png``
            next to the raw PNGs (``False`` leaves them to ``harness data prepare``).

    Datasets sharing a layout (voc21/voc20, context60/59, coco_object/coco_stuff164k) write the same
    files, so writing both into one root is harmless.
    """
    key = _ALIASES.get(name, name)
    if key not in _WRITERS:
        raise DataError(f"no synthetic writer for dataset {name!r}; known: {', '.join(SYNTHETIC_NAMES)}")
    from ..registry import DATASETS

    spec = DATASETS.get(key)
    spec.split(split)  # raises DataError for a split the dataset does not have
    if num_images < 1:
        raise DataError(f"num_images must be >= 1 (got {num_images})")
    return _WRITERS[key](root, int(num_images), (int(size[0]), int(size[1])), int(seed), split, prepared)


#: the few VOC classes of the demo dataset: background, car, cat, dog, person (VOC label ids)
DEMO_VOC_CLASSES: Tuple[int, ...] = (7, 8, 12, 15)


def write_demo_voc(root: str, num_images: int = 8, size: Size = (240, 320), seed: int = 0, split: str = "val") -> str:
    """A small VOC2012-layout set with few classes (``DEMO_VOC_CLASSES``) for ``harness demo`` and probe tests.

    Returns the ``VOCdevkit/VOC2012`` folder (pass it as the ``voc21``/``voc20`` root). Call it once per
    split (``train``, ``val``) to get both under the same root.
    """
    if num_images < 1:
        raise DataError(f"num_images must be >= 1 (got {num_images})")
    return _write_voc(root, int(num_images), (int(size[0]), int(size[1])), int(seed), split,
                      classes=DEMO_VOC_CLASSES, family="demo_voc")


# ---------------------------------------------------------------------------------------------
# raw inputs of the prepare steps
# ---------------------------------------------------------------------------------------------
def write_context_json(root: str, num_images: int = 4, size: Size = (120, 160), seed: int = 0,
                       json_name: str = "trainval_merged.json") -> Tuple[str, str]:
    """Write VOC2010 ``JPEGImages`` plus a PASCAL-in-Detail style ``trainval_merged.json`` (train and val).

    Each label id ``k`` of the synthetic Context label maps becomes one compressed-RLE segmentation
    with the raw Detail id ``CONTEXT_MAPPING[k]`` (background 0 gets no annotation). The content is
    that of :func:`write_synthetic_dataset` for ``context60`` with the same arguments, so
    ``prepare_context`` on this json must reproduce those label maps exactly.
    Returns ``(voc2010_root, json_path)``; the json is written to ``root/json_name``.
    """
    from pycocotools import mask as mask_utils

    data_root = osp.join(root, "VOCdevkit", "VOC2010")
    images, annos = [], []
    ann_id = 1
    for split in ("train", "val"):
        for i, id_ in enumerate(_context_ids(split, int(num_images))):
            s = _context_sample(_rng(seed, "context", split, i), (int(size[0]), int(size[1])))
            _save_jpg(osp.join(data_root, "JPEGImages", id_ + ".jpg"), s.image)
            h, w = s.label.shape
            image_id = int(id_[:4] + id_[5:])  # Detail API: '2008_000002' -> 2008000002
            images.append({"file_name": id_ + ".jpg", "image_id": image_id, "height": h, "width": w,
                           "phase": split, "date_captured": ""})
            for k in np.unique(s.label):
                if k == 0:
                    continue
                rle = mask_utils.encode(np.asfortranarray((s.label == k).astype(np.uint8)))
                annos.append({"id": ann_id, "image_id": image_id, "category_id": int(CONTEXT_MAPPING[int(k)]),
                              "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                              "area": int((s.label == k).sum()), "iscrowd": 0, "parts": []})
                ann_id += 1
    categories = [{"category_id": int(c), "name": f"class_{int(c)}", "supercategory": "object",
                   "onlysemantic": 0, "parts": []} for c in CONTEXT_MAPPING[1:]]
    data = {"info": {"description": "synthetic PASCAL-Context (harness tests)"}, "images": images,
            "annos_segmentation": annos, "categories": categories, "annos_occlusion": [], "annos_boundary": [],
            "annos_joints": [], "parts": []}
    os.makedirs(root, exist_ok=True)
    json_path = osp.join(root, json_name)
    with open(json_path, "w") as f:
        json.dump(data, f)
    return data_root, json_path


def _uncompressed_rle(mask: np.ndarray) -> List[int]:
    """COCO uncompressed RLE counts (column-major runs, starting with a run of zeros)."""
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] == 1 else runs


#: COCO category ids used by the synthetic instances file (a few real, non-contiguous ids)
SYNTHETIC_COCO_CATEGORIES: Tuple[Tuple[int, str], ...] = ((1, "person"), (3, "car"), (18, "dog"), (90, "toothbrush"))


def write_coco_instances(root: str, num_images: int = 3, size: Size = (120, 160), seed: int = 0,
                         split: str = "val2017") -> Tuple[str, str]:
    """Write COCO images and a tiny ``annotations/instances_<split>.json`` (polygons + one crowd RLE each).

    Input of :func:`harness.prepare.labels.prepare_coco_object_from_instances`.
    Returns ``(coco_root, json_path)``.
    """
    from pycocotools import mask as mask_utils

    data_root = osp.join(root, "coco_stuff164k")
    images, anns = [], []
    ann_id = 1
    cat_ids = [c for c, _ in SYNTHETIC_COCO_CATEGORIES]
    for i in range(int(num_images)):
        rng = _rng(seed, "coco_instances", split, i)
        h, w = _image_size(rng, (int(size[0]), int(size[1])))
        img_id = 139 + 1000 * i
        regions = np.full((h, w), 255, dtype=np.int32)
        for k in range(3):
            cat = int(rng.choice(cat_ids))
            bh, bw = int(rng.integers(h // 5, h // 2)), int(rng.integers(w // 5, w // 2))
            y0, x0 = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
            crowd = k == 2
            if crowd:  # uncompressed RLE, as COCO stores crowd regions
                m = np.zeros((h, w), dtype=np.uint8)
                m[y0:y0 + bh, x0:x0 + bw] = 1
                segmentation = {"size": [h, w], "counts": _uncompressed_rle(m)}
                area = float(mask_utils.area(mask_utils.encode(np.asfortranarray(m))))
            else:
                x1, y1 = x0 + bw, y0 + bh
                segmentation = [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]]
                area = float(bw * bh)
            regions[y0:y0 + bh, x0:x0 + bw] = cat
            anns.append({"id": ann_id, "image_id": img_id, "category_id": cat, "segmentation": segmentation,
                         "area": area, "bbox": [x0, y0, bw, bh], "iscrowd": int(crowd)})
            ann_id += 1
        _save_jpg(osp.join(data_root, "images", split, f"{img_id:012d}.jpg"), _render(rng, regions))
        images.append({"id": img_id, "file_name": f"{img_id:012d}.jpg", "height": h, "width": w})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": n, "supercategory": "thing"} for c, n in SYNTHETIC_COCO_CATEGORIES]}
    json_path = osp.join(data_root, "annotations", f"instances_{split}.json")
    os.makedirs(osp.dirname(json_path), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(data, f)
    return data_root, json_path
