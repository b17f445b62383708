"""Label-map preparation for datasets whose evaluation labels are not part of any download.

* ``prepare_coco_object``: the official COCO-Object labels, i.e. the GroupViT ``cvt_coco_object.py``
  remap of the raw COCO-Stuff-164k PNGs that every SCLIP-lineage repo ships (wangf3014/SCLIP@b56bd30
  ``datasets/cvt_coco_object.py``).
* ``prepare_coco_object_from_instances``: our pycocotools fallback from ``instances_val2017.json``;
  **not** byte-identical to the official labels.
* ``prepare_coco_stuff``: mmseg's ``tools/dataset_converters/coco_stuff164k.py`` (mmsegmentation v1.2.2).
* ``prepare_context``: mmseg's ``tools/dataset_converters/pascal_context.py`` (§2.7) without the
  Detail API package (not on PyPI): ``trainval_merged.json`` is read directly, reproducing what
  ``Detail.getMask(img)`` does (zhanghang1989/detail-api ``PythonAPI/detail/__init__.py``).

Each function returns a summary dict and raises :class:`harness.errors.DataError` with the missing
file or folder and the fix. Only numpy and Pillow are imported at module level (the synthetic writers
import the id tables from here); pycocotools is imported where it is needed.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import multiprocessing
import os
import os.path as osp
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..errors import DataError

# ---------------------------------------------------------------------------------------------
# COCO-Stuff-164k id tables
# ---------------------------------------------------------------------------------------------
#: Raw COCO-Stuff ids that have no category (unused ids of the 182-id COCO list). Together with
#: ``range(182)`` and 255 they define mmseg's ``clsID_to_trID`` (mmseg 1.2.2
#: ``tools/dataset_converters/coco_stuff164k.py``): the 171 used ids map, in order, to 0..170 and
#: 255 -> 255. ``tests/datasets`` checks this table against the converter file shipped with mmseg.
COCO_STUFF_UNUSED_IDS: Tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
#: raw ids > this value are stuff (and 255 unlabeled); 0..90 are things (GroupViT ``cvt_coco_object.py``)
COCO_LAST_THING_ID = 90
#: val2017 image count (COCO 2017 val, 5,000 images; Caesar et al., COCO-Stuff, CVPR 2018, arXiv:1612.03716);
#: a warning, never an assert (the converter's 123,287-file assert needs train2017 as well)
COCO_VAL2017_COUNT = 5000


def coco_stuff_clsid_to_trid() -> Dict[int, int]:
    """mmseg's ``clsID_to_trID``: raw COCO-Stuff id (0..181, 255) -> train id (0..170, 255)."""
    used = [i for i in range(182) if i not in COCO_STUFF_UNUSED_IDS]
    table = {raw: tr for tr, raw in enumerate(used)}
    table[255] = 255
    return table


def coco_object_clsid_to_trid() -> Dict[int, int]:
    """GroupViT's COCO-Object table: ``trID + 1``, then every raw id > 90 (stuff and 255) -> 0."""
    table = {}
    for raw, tr in coco_stuff_clsid_to_trid().items():
        table[raw] = 0 if raw > COCO_LAST_THING_ID else tr + 1
    return table


def _lut(table: Dict[int, int]) -> np.ndarray:
    # The converters do ``out[mask == raw] = tr`` for each table entry on a copy of the mask, so a value
    # that is not in the table keeps its value: an identity LUT overwritten by the table is exact.
    lut = np.arange(256, dtype=np.uint8)
    for raw, tr in table.items():
        lut[raw] = tr
    return lut


def remap_coco_object(raw: np.ndarray) -> np.ndarray:
    """Raw COCO-Stuff label map (uint8, ids 0..181, 255) -> COCO-Object label map (0..80, no ignore)."""
    return _lut(coco_object_clsid_to_trid())[np.asarray(raw, dtype=np.uint8)]


def remap_coco_stuff(raw: np.ndarray) -> np.ndarray:
    """Raw COCO-Stuff label map -> mmseg ``labelTrainIds`` (0..170, 255 = unlabeled)."""
    return _lut(coco_stuff_clsid_to_trid())[np.asarray(raw, dtype=np.uint8)]


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _map(fn: Callable[[Any], Any], items: Sequence[Any], workers: Optional[int]) -> List[Any]:
    """``map`` over ``items``, in a process pool when ``workers > 1`` and there is enough work."""
    workers = _default_workers() if workers is None else max(1, int(workers))
    if workers == 1 or len(items) < 2 * workers:
        return [fn(x) for x in items]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(pool.imap(fn, items, chunksize=max(1, min(64, len(items) // (4 * workers)))))


def _read_label_png(path: str) -> np.ndarray:
    """Read a single-channel label PNG as the converters do (``np.array(Image.open(path))``)."""
    try:
        with Image.open(path) as im:
            arr = np.array(im)
    except OSError as e:
        raise DataError(f"cannot read label map {path}: {e} (is the file truncated? re-extract it)") from e
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise DataError(
            f"{path} is not a single-channel 8-bit label map (shape {arr.shape}, dtype {arr.dtype}): the folder "
            "must hold the raw COCO-Stuff label PNGs of stuffthingmaps_trainval2017.zip, not colour images"
        )
    return arr


def _coco_raw_pngs(root: str, split: str, prepare_name: str) -> List[str]:
    ann_dir = osp.join(root, "annotations", split)
    if not osp.isdir(root):
        raise DataError(
            f"COCO-Stuff root {root!r} does not exist (expected the folder holding images/ and annotations/)"
        )
    if not osp.isdir(ann_dir):
        raise DataError(
            f"missing folder {ann_dir}: unzip the COCO-Stuff stuffthingmaps_trainval2017.zip into "
            f"{osp.join(root, 'annotations')} (it contains train2017/ and val2017/), then run "
            f"`harness data prepare {prepare_name} --root {root}` again"
        )
    # same selection as the converters: every *.png of the folder whose name does not contain
    # 'TrainIds' (outputs of this or the other converter)
    files = sorted(f for f in glob.glob(osp.join(ann_dir, "*.png")) if "TrainIds" not in osp.basename(f))
    if not files:
        raise DataError(
            f"no raw COCO-Stuff label PNGs (<id>.png) in {ann_dir}: unzip stuffthingmaps_trainval2017.zip into "
            f"{osp.join(root, 'annotations')}"
        )
    return files


class _RemapJob:
    """Picklable per-file job for the process pool: read raw PNG, apply the LUT, write ``<id><suffix>``."""

    def __init__(self, lut: np.ndarray, suffix: str, known: np.ndarray) -> None:
        self.lut, self.suffix, self.known = lut, suffix, known

    def __call__(self, path: str) -> Tuple[str, bool]:
        raw = _read_label_png(path)
        unexpected = bool((~self.known[raw]).any())
        # output name as in the converters: basename up to the first '.' + suffix
        out = osp.join(osp.dirname(path), osp.basename(path).split(".")[0] + self.suffix)
        Image.fromarray(self.lut[raw]).save(out, "PNG")
        return out, unexpected


def _remap_folder(root: str, splits: Iterable[str], table: Dict[int, int], suffix: str, prepare_name: str,
                  workers: Optional[int]) -> Dict[str, Any]:
    known = np.zeros(256, dtype=bool)
    known[list(table)] = True
    job = _RemapJob(_lut(table), suffix, known)
    summary: Dict[str, Any] = {"root": root, "suffix": suffix, "written": {}, "warnings": []}
    inputs = {split: _coco_raw_pngs(root, split, prepare_name) for split in splits}  # fail before writing
    for split, files in inputs.items():
        results = _map(job, files, workers)
        summary["written"][split] = len(results)
        odd = [out for out, unexpected in results if unexpected]
        if odd:
            summary["warnings"].append(
                f"{len(odd)} {split} label maps contain ids that are not COCO-Stuff ids (kept unchanged, as the "
                f"official converter does), e.g. {odd[0]}"
            )
        if split == "val2017" and len(files) != COCO_VAL2017_COUNT:
            summary["warnings"].append(
                f"{len(files)} raw val2017 label maps found, the official split has {COCO_VAL2017_COUNT}"
            )
        img_dir = osp.join(root, "images", split)
        if not osp.isdir(img_dir):
            summary["warnings"].append(f"image folder {img_dir} is missing (the dataset needs it for evaluation)")
    summary["total_written"] = sum(summary["written"].values())
    return summary


# ---------------------------------------------------------------------------------------------
# COCO-Object / COCO-Stuff
# ---------------------------------------------------------------------------------------------
def prepare_coco_object(root: str, splits: Sequence[str] = ("val2017",),
                        workers: Optional[int] = None) -> Dict[str, Any]:
    """Write ``annotations/<split>/<id>_instanceTrainIds.png`` from the raw COCO-Stuff-164k PNGs.

    Exactly GroupViT's ``cvt_coco_object.py`` as copied by SCLIP/NACLIP/... (wangf3014/SCLIP@b56bd30):
    raw id -> mmseg ``clsID_to_trID`` -> +1, and every raw id > 90 (all stuff *and* 255 unlabeled) -> 0,
    so things are 1..80 and there is no ignore label. Differences from the script, on purpose: no
    123,287-file assert (val2017 alone is enough), no image copy, mmengine-free.

    Args:
        root: the COCO-Stuff root (holds ``images/`` and ``annotations/``).
        splits: annotation sub-folders to convert.
        workers: processes (default: up to 8).

    Returns:
        ``{"root", "suffix", "written": {split: n}, "total_written", "warnings": [...]}``.
    """
    return _remap_folder(root, splits, coco_object_clsid_to_trid(), "_instanceTrainIds.png", "coco_object", workers)


def prepare_coco_stuff(root: str, splits: Sequence[str] = ("val2017",),
                       workers: Optional[int] = None) -> Dict[str, Any]:
    """Write ``annotations/<split>/<id>_labelTrainIds.png`` (171 classes, 255 ignore) from the raw PNGs.

    Same mapping as mmseg's ``tools/dataset_converters/coco_stuff164k.py`` (mmsegmentation v1.2.2),
    without its 123,287-file assert. Returns the same summary as :func:`prepare_coco_object`.
    """
    return _remap_folder(root, splits, coco_stuff_clsid_to_trid(), "_labelTrainIds.png", "coco_stuff", workers)


def prepare_coco_object_from_instances(root: str, instances_json: str, split: str = "val2017") -> Dict[str, Any]:
    """Fallback COCO-Object labels from COCO *instance* annotations (pycocotools). NOT byte-identical.

    Use only when the raw COCO-Stuff PNGs are unavailable: each
    image starts at 0, instances are painted in descending ``area`` order (small objects end on top),
    label = 1 + rank of ``category_id`` in ``sorted(getCatIds())``, ``iscrowd`` regions included.
    Differences from the official remap come from overlap order and crowd handling; compare both on a
    subset before relying on it. Writes ``annotations/<split>/<stem>_instanceTrainIds.png``.
    """
    if not osp.isfile(instances_json):
        raise DataError(
            f"instances file {instances_json!r} not found: download COCO annotations_trainval2017.zip and pass "
            f"annotations/instances_{split}.json"
        )
    if not osp.isdir(root):
        raise DataError(f"COCO root {root!r} does not exist (expected the folder holding images/ and annotations/)")
    try:
        from pycocotools.coco import COCO
    except ImportError as e:  # pragma: no cover - pycocotools is a declared dependency
        raise DataError("the fallback needs pycocotools: `pip install pycocotools`") from e
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
        try:
            coco = COCO(instances_json)
        except (ValueError, KeyError, AssertionError) as e:
            raise DataError(f"{instances_json} is not a COCO instances file: {e}") from e
    cat_ids = sorted(coco.getCatIds())
    if not cat_ids:
        raise DataError(f"{instances_json} has no categories: is it an instances_*.json file?")
    label_of = {cid: rank + 1 for rank, cid in enumerate(cat_ids)}
    out_dir = osp.join(root, "annotations", split)
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        label = np.zeros((int(info["height"]), int(info["width"])), dtype=np.uint8)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None))
        for ann in sorted(anns, key=lambda a: -float(a.get("area", 0.0))):  # stable: ties keep file order
            m = coco.annToMask(ann)
            if m.shape != label.shape:
                raise DataError(
                    f"annotation {ann.get('id')} of image {info['file_name']} has size {m.shape}, the image "
                    f"record says {label.shape} ({instances_json})"
                )
            label[m > 0] = label_of[ann["category_id"]]
        stem = osp.splitext(info["file_name"])[0]
        Image.fromarray(label).save(osp.join(out_dir, stem + "_instanceTrainIds.png"), "PNG")
        written += 1
    return {
        "root": root,
        "suffix": "_instanceTrainIds.png",
        "written": {split: written},
        "total_written": written,
        "num_categories": len(cat_ids),
        "warnings": [
            "labels built from instance annotations (pycocotools fallback): not byte-identical to the official "
            "COCO-Object remap of the COCO-Stuff PNGs; do not mix results with official-label runs"
        ],
    }


# ---------------------------------------------------------------------------------------------
# PASCAL Context
# ---------------------------------------------------------------------------------------------
#: The 60 raw PASCAL-in-Detail category ids kept by PASCAL Context (0 = background), sorted; from mmseg's
#: ``tools/dataset_converters/pascal_context.py`` ``_mapping`` (mmsegmentation v1.2.2). Label = index.
CONTEXT_MAPPING = np.sort(np.array([
    0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284,
    158, 159, 416, 33, 162, 420, 454, 295, 296, 427, 44, 45, 46, 308, 59,
    440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458, 34, 207, 80, 355,
    85, 347, 220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115,
]))
_CONTEXT_KEY = np.arange(len(CONTEXT_MAPPING)).astype("uint8")
#: official val count (PASCAL Context, Mottaghi et al., CVPR 2014: 5,105 val images); a warning when it differs
CONTEXT_VAL_COUNT = 5105


def _decode_rle(seg: Any, h: int, w: int) -> np.ndarray:
    """Detail's ``decodeMask`` (= pycocotools ``mask.decode``); uncompressed RLE / polygons converted first."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, dict) and isinstance(seg.get("counts"), str):
        seg = dict(seg, counts=seg["counts"].encode("ascii"))
    elif isinstance(seg, list) or (isinstance(seg, dict) and isinstance(seg.get("counts"), list)):
        seg = mask_utils.frPyObjects(seg, h, w)
        if isinstance(seg, list):
            seg = mask_utils.merge(seg)
    return mask_utils.decode(seg)


def context_class_to_index(mask: np.ndarray, where: str) -> np.ndarray:
    """Raw Detail category ids -> 0..59 (mmseg's ``_class_to_index``: assert, then ``np.digitize``)."""
    values = np.unique(mask)
    bad = [int(v) for v in values if v not in CONTEXT_MAPPING]
    if bad:
        raise DataError(
            f"{where} contains category ids {bad[:8]} that are not among the 60 PASCAL-Context ids: use "
            "trainval_merged.json (the 59-class merged file), not the full 459-class PASCAL-in-Detail json"
        )
    index = np.digitize(mask.ravel(), CONTEXT_MAPPING, right=True)
    return _CONTEXT_KEY[index].reshape(mask.shape)


class _ContextJob:
    """Picklable per-image job: paint the class mask as ``Detail.getMask(img)`` does, digitize, save."""

    def __init__(self, out_dir: str, json_path: str) -> None:
        self.out_dir, self.json_path = out_dir, json_path

    def __call__(self, item: Tuple[Dict[str, Any], List[Dict[str, Any]]]) -> str:
        img, anns = item
        h, w = int(img["height"]), int(img["width"])
        mask = np.zeros((h, w))  # float64, as in Detail.getMask
        for ann in anns:  # later annotations overwrite earlier ones, as in getMask
            m = _decode_rle(ann["segmentation"], h, w)
            if m.shape[:2] != (h, w):
                raise DataError(
                    f"segmentation {ann.get('id')} of {img['file_name']} is {m.shape[0]}x{m.shape[1]} (HxW) but "
                    f"the image record says {h}x{w} ({self.json_path})"
                )
            mask[np.nonzero(m)] = ann["category_id"]
        label = context_class_to_index(mask, f"image {img['file_name']} of {self.json_path}")
        filename = img["file_name"]
        Image.fromarray(label).save(osp.join(self.out_dir, filename.replace("jpg", "png")))
        return osp.splitext(osp.basename(filename))[0]


def _resolve_voc2010(root: str) -> str:
    if osp.isdir(osp.join(root, "JPEGImages")):
        return root
    for sub in ("VOC2010", osp.join("VOCdevkit", "VOC2010")):
        if osp.isdir(osp.join(root, sub, "JPEGImages")):
            return osp.join(root, sub)
    if not osp.isdir(root):
        raise DataError(
            f"PASCAL Context root {root!r} does not exist: pass the VOCdevkit/VOC2010 folder of the VOC 2010 "
            "trainval archive"
        )
    raise DataError(
        f"{osp.join(root, 'JPEGImages')} not found: --root must be the VOCdevkit/VOC2010 folder of the PASCAL VOC "
        "2010 trainval archive (it holds JPEGImages/)"
    )


def prepare_context(root: str, json_path: str, splits: Sequence[str] = ("train", "val"),
                    workers: Optional[int] = None) -> Dict[str, Any]:
    """Build ``SegmentationClassContext/<id>.png`` (labels 0..59) and ``ImageSets/SegmentationContext/*.txt``.

    Reproduces mmseg's ``tools/dataset_converters/pascal_context.py`` (mmsegmentation v1.2.2) without
    the Detail API: for each image of the phase, the ``annos_segmentation`` RLEs are painted in file
    order with their raw ``category_id`` (``Detail.getMask``), every value must be one of the 60
    ``_mapping`` ids, and ``np.digitize`` maps them to 0..59 (0 = background).

    Args:
        root: the ``VOCdevkit/VOC2010`` folder (``VOCdevkit`` or its parent are accepted too).
        json_path: PASCAL-Context ``trainval_merged.json``.
        splits: Detail phases to convert; each writes ``ImageSets/SegmentationContext/<split>.txt``.
        workers: processes (default: up to 8).

    Returns:
        ``{"root", "written": {split: n}, "total_written", "split_files", "missing_images", "warnings"}``.
    """
    voc2010 = _resolve_voc2010(root)
    if not osp.isfile(json_path):
        raise DataError(
            f"annotation file {json_path!r} not found: download the PASCAL-Context trainval_merged.json and pass it "
            "with --json"
        )
    try:
        with open(json_path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {json_path} as JSON: {e} (is the download complete?)") from e
    if not isinstance(data, dict) or "images" not in data or "annos_segmentation" not in data:
        raise DataError(
            f"{json_path} is not a PASCAL-in-Detail annotation file (it needs the keys 'images' and "
            "'annos_segmentation'): use trainval_merged.json"
        )
    # Detail.__createIndex: segmentations keyed by id (a repeated id keeps its first position, last value)
    segmentations: Dict[Any, Dict[str, Any]] = {}
    for segm in data["annos_segmentation"]:
        segmentations[segm["id"]] = segm
    per_image: Dict[Any, List[Dict[str, Any]]] = {}
    for segm in segmentations.values():
        per_image.setdefault(segm["image_id"], []).append(segm)
    images: Dict[Any, Dict[str, Any]] = {}
    for img in data["images"]:
        images[img["image_id"]] = img

    out_dir = osp.join(voc2010, "SegmentationClassContext")
    list_dir = osp.join(voc2010, "ImageSets", "SegmentationContext")
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(list_dir, exist_ok=True)
    job = _ContextJob(out_dir, json_path)
    summary: Dict[str, Any] = {"root": voc2010, "written": {}, "split_files": {}, "missing_images": {}, "warnings": []}
    for split in splits:
        if split not in ("train", "val", "test"):
            raise DataError(f"unknown PASCAL Context split {split!r}: use train and/or val")
        todo = [(img, per_image.get(img["image_id"], [])) for img in images.values() if img.get("phase") == split]
        if not todo:
            raise DataError(f"{json_path} has no images of phase {split!r}: is it trainval_merged.json?")
        names = sorted(_map(job, todo, workers))
        list_file = osp.join(list_dir, f"{split}.txt")
        with open(list_file, "w") as f:
            f.writelines(n + "\n" for n in names)
        summary["written"][split] = len(names)
        summary["split_files"][split] = list_file
        missing = [n for n in names if not osp.isfile(osp.join(voc2010, "JPEGImages", n + ".jpg"))]
        summary["missing_images"][split] = len(missing)
        if missing:
            summary["warnings"].append(
                f"{len(missing)} {split} images listed in the json are missing from {osp.join(voc2010, 'JPEGImages')}, "
                f"e.g. {missing[0]}.jpg: is this the VOC 2010 trainval archive?"
            )
        if split == "val" and len(names) != CONTEXT_VAL_COUNT:
            summary["warnings"].append(
                f"{len(names)} val label maps written, the official split has {CONTEXT_VAL_COUNT}"
            )
    summary["total_written"] = sum(summary["written"].values())
    return summary
