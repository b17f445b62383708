"""Class-name files (``harness/text/names/<set>/<key>.txt``): one line per class, in label order.

The files are verbatim copies of the repositories' ``configs/cls_*.txt`` (see ``names/README.md`` for
repository, commit and path). They are parsed exactly as the repositories' ``get_cls_idx`` does:
``readlines()``, split each line on the set's separator, then delete ``'\\n'``. Nothing is stripped, so
quirks such as the trailing space of ``wood `` in SCLIP's Context-60 file reach the prompt as they do
in the original code (wangf3014/SCLIP@b56bd30 ``configs/cls_context60.txt``).
"""
from __future__ import annotations

import os
from typing import Dict, List

from ..errors import ConfigError

NAMES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "names")

#: separator between alternative names on one line, per name set.
#: SCLIP lineage (SCLIP/NACLIP/SC-CLIP/ResCLIP/CASS): ``name_sets[idx].split(', ')``;
#: ClearCLIP: ``split(',')`` (``get_cls_idx`` in wangf3014/SCLIP@b56bd30 ``clip_segmentor.py`` and
#: mc-lan/ClearCLIP@ad68a40 ``clearclip_segmentor.py``).
SEPARATORS: Dict[str, str] = {"sclip": ", ", "clearclip": ","}


def available_name_sets() -> Dict[str, List[str]]:
    """Every name set on disk with its keys, so errors can say what exists."""
    out: Dict[str, List[str]] = {}
    if not os.path.isdir(NAMES_DIR):
        return out
    for set_name in sorted(os.listdir(NAMES_DIR)):
        d = os.path.join(NAMES_DIR, set_name)
        if os.path.isdir(d):
            out[set_name] = sorted(fn[:-4] for fn in os.listdir(d) if fn.endswith(".txt"))
    return out


def _known() -> str:
    sets = available_name_sets()
    return "; ".join(f"{s}: {', '.join(keys) or '(none)'}" for s, keys in sets.items()) or "(no name files found)"


def name_file_path(set_name: str, key: str) -> str:
    """Path of the name file ``<set_name>/<key>.txt``; a :class:`ConfigError` lists what exists otherwise."""
    if set_name not in SEPARATORS:
        raise ConfigError(f"unknown name set {set_name!r}; known name sets and keys: {_known()}")
    path = os.path.join(NAMES_DIR, set_name, f"{key}.txt")
    if not os.path.isfile(path):
        raise ConfigError(f"name set {set_name!r} has no file for {key!r} ({path}); known name sets and keys: "
                          f"{_known()}")
    return path


def parse_name_lines(lines: List[str], separator: str) -> List[List[str]]:
    """Split ``readlines()`` output into one list of names per class, exactly like the repos' ``get_cls_idx``."""
    return [[name.replace("\n", "") for name in line.split(separator)] for line in lines]


def load_name_set(set_name: str, key: str) -> List[List[str]]:
    """Names per class, in label order, for dataset ``key`` of name set ``set_name`` (e.g. ``sclip``, ``voc21``).

    Index 0 is the background class for the with-background datasets (VOC21, Context-60, COCO-Object),
    because every repo assigns low-confidence pixels to label 0.
    """
    path = name_file_path(set_name, key)
    # text mode (universal newlines) + readlines(), as in the repositories
    with open(path, "r", encoding="utf-8") as f:
        lines = f.readlines()
    names = parse_name_lines(lines, SEPARATORS[set_name])
    if not names:
        raise ConfigError(f"name file {path} is empty")
    return names


def check_class_count(names: List[List[str]], num_classes: int, where: str) -> None:
    """Raise :class:`ConfigError` when a name file's class count differs from the dataset's.

    A mismatch would silently shift every label after the first missing line, so it must stop the run.
    """
    if len(names) != num_classes:
        raise ConfigError(
            f"{where}: the name file has {len(names)} classes (lines) but the dataset has {num_classes}; "
            f"each line must name exactly one class, in label order (background first for "
            f"with-background datasets)"
        )
