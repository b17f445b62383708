"""Bad images and label maps: found before a run starts, named in one line, failed on or skipped.

Every evaluator builds its data through :meth:`DatasetSpec.build`, which calls :func:`screen` and
:func:`checked`, so each task (and any new evaluator using ``spec.build``) gets the same handling:

* :func:`screen` reads every sample's file headers and tails before any work: a missing or empty file, bytes
  that are no image (a corrupt JPEG), a JPEG without its end-of-image marker or a PNG without its ``IEND``
  chunk (a truncated download or copy; OpenCV would silently decode the missing part as grey), an image and
  label map of different sizes, and -- when skipping -- label ids outside ``0..num_classes-1`` and 255.
  With ``--on-bad-image fail`` (the default) the first problem is a :class:`DataError`; with ``skip`` the
  bad samples are dropped from the dataset and listed (``dataset.harness_skipped``) for the record.
* :func:`checked` makes a sample that still fails while loading (decoder error, label ids out of range)
  a :class:`DataError` naming its files, also inside DataLoader workers.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError, HarnessError

#: ``--on-bad-image`` choices
ON_BAD_IMAGE = ("fail", "skip")
#: bytes read from a file's end to find its end marker (JPEG EOI ``FFD9``, PNG ``IEND`` chunk); a little slack
#: allows the padding some writers append after the marker (JPEG: ITU-T T.81 Annex B.2.1; PNG: RFC 2083 sec. 3.2)
TAIL_BYTES = 4096
JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
PNG_SIGNATURE, PNG_IEND = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"  # IEND type + its fixed CRC (RFC 2083 sec. 4.1.4)


def file_problem(path: str) -> Optional[str]:
    """Why the image file at ``path`` cannot be used as a whole, or None (headers and tail only)."""
    from PIL import Image

    if not os.path.isfile(path):
        return "does not exist"
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
    except OSError as e:
        return f"cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if head.startswith(JPEG_SOI) and JPEG_EOI not in tail:
        return f"is a truncated JPEG (no end-of-image marker in its last {TAIL_BYTES} bytes, {size} bytes in all)"
    if head.startswith(PNG_SIGNATURE) and PNG_IEND not in tail:
        return f"is a truncated PNG (no IEND chunk at its end, {size} bytes in all)"
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - the header parse is the check
    except (OSError, ValueError) as e:
        return f"is not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def _size_text(shape: Sequence[int]) -> str:
    return f"{int(shape[0])}x{int(shape[1])} (HxW)"


def check_sample_shapes(img_path: str, seg_path: str, img_shape: Sequence[int], seg_shape: Sequence[int]) -> None:
    """Raise :class:`DataError` when a label map and its image differ in size.

    Why: mmseg resizes predictions back to the *image* size and compares them with the label map
    pixel by pixel; a label map of another size (wrong file, half-converted folder, EXIF-rotated image)
    otherwise fails deep inside the metric with a shape error that names neither file.
    ``img_shape``/``seg_shape`` are (H, W, ...) as loaded (e.g. ``ori_shape`` and ``gt_seg_map.shape``).
    """
    ih, iw = int(img_shape[0]), int(img_shape[1])
    sh, sw = int(seg_shape[0]), int(seg_shape[1])
    if (ih, iw) == (sh, sw):
        return
    hint = ""
    if (ih, iw) == (sw, sh):
        hint = " (height and width are swapped: the image probably carries an EXIF rotation tag)"
    raise DataError(
        f"label map {seg_path} has size {_size_text((sh, sw))} but its image {img_path} has size "
        f"{_size_text((ih, iw))}{hint}. Every label map must have exactly its image's size: re-extract or "
        f"re-generate this label map (and check that the label folder belongs to this image folder)."
    )


def _image_size(path: str) -> Tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return h, w


def label_value_problem(spec: Any, seg_path: str) -> Optional[str]:
    """Label ids outside the class range (other than 255), as mmseg would load them, or None."""
    if not getattr(spec, "num_classes", 0):
        return None
    from PIL import Image

    with Image.open(seg_path) as im:
        arr = np.asarray(im).astype(np.int64)
    if arr.ndim != 2:
        return f"label map {seg_path} has {arr.ndim} dimensions (shape {arr.shape}); expected one id per pixel"
    if spec.reduce_zero_label:  # mmseg LoadAnnotations(reduce_zero_label=True): 0 -> 255, others - 1
        arr = np.where(arr == 0, 255, arr - 1)
        arr[arr == 254] = 255
    try:
        spec.check_label_values(seg_path, arr)
    except DataError as e:
        return str(e)
    return None


def sample_problem(spec: Any, img_path: str, seg_path: str, values: bool = False) -> Optional[str]:
    """Why the sample (image, label map) cannot be evaluated, as one sentence naming the file, or None."""
    for path, what in ((img_path, "image"), (seg_path, "label map")):
        why = file_problem(path)
        if why:
            return f"{what} {path} {why}"
    try:
        check_sample_shapes(img_path, seg_path, _image_size(img_path), _image_size(seg_path))
    except DataError as e:
        return str(e).split(". Every label map")[0]
    return label_value_problem(spec, seg_path) if values else None


def annotation_path(info: Dict[str, Any]) -> str:
    """The label (or depth) map of an mmseg data-info dict."""
    return str(info.get("seg_map_path") or info.get("depth_map_path") or "")


def screen(spec: Any, ds: Any, on_bad_image: str = "fail") -> List[Dict[str, str]]:
    """Check every sample of ``ds`` (see module doc); drop the bad ones when skipping; return what was skipped.

    ``fail``: raise :class:`DataError` with the first problem and how many samples have one.
    ``skip``: ``ds`` keeps only good samples (mmengine ``get_subset_``); the return value (also stored as
    ``ds.harness_skipped``) lists ``{"image", "label", "reason"}`` for the record.
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise DataError(f"--on-bad-image {on_bad_image!r}: expected one of {', '.join(ON_BAD_IMAGE)}")
    skip = on_bad_image == "skip"
    good: List[int] = []
    bad: List[Dict[str, str]] = []
    for i in range(len(ds)):
        info = ds.get_data_info(i)
        img, ann = str(info["img_path"]), annotation_path(info)
        why = sample_problem(spec, img, ann, values=skip)
        if why is None:
            good.append(i)
        else:
            bad.append({"image": img, "label": ann, "reason": why})
    _decide(bad, len(good), skip, spec.name)
    if bad:
        ds.get_subset_(good)
    ds.harness_skipped = bad
    return bad


def _decide(bad: List[Dict[str, str]], num_good: int, skip: bool, name: str) -> None:
    """Fail on the first bad sample, or announce the skip (and fail when nothing is left)."""
    if bad and not skip:
        more = f" ({len(bad) - 1} more bad sample(s) in this split)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]['reason']}{more}; fix or remove the file, or pass --on-bad-image skip to leave "
                        f"bad samples out (the record is then marked partial)")
    if bad:
        if not num_good:
            raise DataError(f"every one of the {len(bad)} samples of {name} is bad, e.g. {bad[0]['reason']}")
        print(f"harness: skipping {len(bad)} bad sample(s) of {name}, e.g. {bad[0]['reason']}", file=sys.stderr)


def screen_images(paths: Sequence[str], on_bad_image: str = "fail", name: str = "folder"
                  ) -> Tuple[List[str], List[Dict[str, str]]]:
    """:func:`screen` for an unlabelled list of image files: (good paths, skipped ``{"image", "reason"}``)."""
    if on_bad_image not in ON_BAD_IMAGE:
        raise DataError(f"--on-bad-image {on_bad_image!r}: expected one of {', '.join(ON_BAD_IMAGE)}")
    good: List[str] = []
    bad: List[Dict[str, str]] = []
    for p in paths:
        why = file_problem(p)
        if why is None:
            good.append(p)
        else:
            bad.append({"image": p, "reason": f"image {p} {why}"})
    _decide(bad, len(good), on_bad_image == "skip", name)
    return good, bad


def _checked_getitem(base: type):
    """``__getitem__`` of ``base`` whose loading errors name the sample's files (see :func:`checked`)."""
    load = base.__getitem__

    def __getitem__(self: Any, idx: int) -> Any:
        try:
            data = load(self, idx)
        except HarnessError:
            raise
        except Exception as e:  # decoder errors, mmcv's "failed to load image" assertion, ...
            info = self.get_data_info(idx)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"cannot load image {info['img_path']} / {annotation_path(info)}: {reason}; fix or "
                            f"remove the file") from None
        spec = getattr(self, "harness_spec", None)
        if isinstance(data, dict) and "gt_seg_map" in data and spec is not None and spec.num_classes:
            spec.check_label_values(data.get("seg_map_path", "?"), data["gt_seg_map"])
        return data

    return __getitem__


_CHECKED: Dict[type, type] = {}


def checked(spec: Any, ds: Any) -> Any:
    """Make loading errors of ``ds`` (an mmseg dataset) name the sample's files.

    In place: ``ds`` becomes an instance of a subclass of its own class (so it stays e.g. a
    ``PascalVOCDataset``) whose ``__getitem__`` turns any loading error, and label ids out of range, into a
    :class:`DataError`.
    """
    cls = type(ds)
    if not getattr(cls, "harness_checked", False):
        if cls not in _CHECKED:
            name = cls.__name__  # same name: it is still that mmseg class for anyone who asks
            new = type(name, (cls,), {"__getitem__": _checked_getitem(cls), "harness_checked": True,
                                      "__module__": __name__, "__qualname__": name})
            globals()[name] = new  # importable by name (harness.datasets.safety.<name>): picklable for spawn
            _CHECKED[cls] = new
        ds.__class__ = _CHECKED[cls]
    ds.harness_spec = spec
    return ds
