"""Name files are verbatim data and parse exactly like the repositories' ``get_cls_idx``."""
from __future__ import annotations

import hashlib
import os
import re
from typing import List, Tuple

import pytest

from harness.errors import ConfigError
from harness.text import names as names_mod
from harness.text.names import (
    NAMES_DIR,
    SEPARATORS,
    available_name_sets,
    check_class_count,
    load_name_set,
    name_file_path,
)

# class counts per dataset (shared/reference/ovss.md §2.2, "#eval classes")
SCLIP_COUNTS = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81, "coco_stuff": 171,
                "cityscapes": 19, "ade20k": 150}


def get_cls_idx(path: str, sep: str) -> Tuple[List[str], List[int]]:
    """The repositories' parser (SCLIP ``clip_segmentor.py``; ClearCLIP uses ``','``), for comparison."""
    with open(path, "r") as f:
        name_sets = f.readlines()
    class_names, class_indices = [], []
    for idx in range(len(name_sets)):
        names_i = name_sets[idx].split(sep)
        class_names += names_i
        class_indices += [idx for _ in range(len(names_i))]
    class_names = [item.replace("\n", "") for item in class_names]
    return class_names, class_indices


def test_all_sclip_keys_present_with_dataset_class_counts() -> None:
    assert available_name_sets()["sclip"] == sorted(SCLIP_COUNTS)
    for key, n in SCLIP_COUNTS.items():
        names = load_name_set("sclip", key)
        assert len(names) == n, key
        check_class_count(names, n, f"sclip/{key}")


@pytest.mark.parametrize("set_name", sorted(SEPARATORS))
def test_parser_matches_repository_parser(set_name: str) -> None:
    for key in available_name_sets()[set_name]:
        path = name_file_path(set_name, key)
        flat, idx = get_cls_idx(path, SEPARATORS[set_name])
        ours = load_name_set(set_name, key)
        assert [n for cls in ours for n in cls] == flat
        assert [i for i, cls in enumerate(ours) for _ in cls] == idx


def test_quirks_are_kept() -> None:
    for set_name, keys in available_name_sets().items():
        for key in keys:
            with open(name_file_path(set_name, key), "rb") as f:
                data = f.read()
            assert not data.endswith(b"\n"), f"{set_name}/{key} must keep its missing final newline"
            assert b"\r" not in data
    ctx60 = load_name_set("sclip", "context60")
    assert ctx60[0] == ["background"]
    assert ctx60[-1] == ["wood "]  # trailing space survives, as in the original parser
    assert load_name_set("sclip", "context59")[-1] == ["wood"]


def test_sclip_aliases_and_background_words() -> None:
    voc21 = load_name_set("sclip", "voc21")
    assert len(voc21[0]) == 26 and voc21[0][:3] == ["sky", "wall", "tree"] and voc21[0][-1] == "fence"
    person = voc21[15]
    assert person[0] == "person" and len(person) == 7
    assert voc21[20] == ["television monitor", "tv monitor", "monitor", "television", "screen"]
    assert voc21[4] == ["ship"] and voc21[11] == ["table"]
    assert load_name_set("sclip", "voc20") == voc21[1:]
    obj = load_name_set("sclip", "coco_object")
    assert obj[0] == voc21[0]
    assert obj[1] == person + ["body"]
    assert "trafficlight" in [n for cls in load_name_set("sclip", "coco_stuff") for n in cls]


def test_clearclip_voc21_uses_plain_names() -> None:
    voc21 = load_name_set("clearclip", "voc21")
    assert len(voc21) == 21
    assert voc21[0] == ["background"] and voc21[15] == ["person"] and voc21[20] == ["tvmonitor"]
    assert all(len(cls) == 1 for cls in voc21)


def test_unknown_set_or_key_lists_what_exists() -> None:
    with pytest.raises(ConfigError, match=r"unknown name set 'nope'.*sclip: .*voc21"):
        load_name_set("nope", "voc21")
    with pytest.raises(ConfigError, match=r"no file for 'ade20k'.*clearclip: voc21"):
        load_name_set("clearclip", "ade20k")


def test_class_count_mismatch_is_an_error() -> None:
    names = load_name_set("sclip", "voc20")
    with pytest.raises(ConfigError, match=r"voc21 check: the name file has 20 classes .* dataset has 21"):
        check_class_count(names, 21, "voc21 check")


def test_readme_records_every_file_and_its_hash() -> None:
    with open(os.path.join(NAMES_DIR, "README.md")) as f:
        readme = f.read()
    rows = {m.group(1): (int(m.group(2)), m.group(3))
            for m in re.finditer(r"^\| `([a-z]+/[a-z0-9_]+\.txt)` \|[^|]+\|[^|]+\| (\d+) \| ([0-9a-f]{16}) \|$",
                                 readme, re.M)}
    on_disk = {f"{s}/{k}.txt" for s, keys in available_name_sets().items() for k in keys}
    assert set(rows) == on_disk
    for rel, (size, sha) in rows.items():
        with open(os.path.join(NAMES_DIR, rel), "rb") as f:
            data = f.read()
        assert len(data) == size, rel
        assert hashlib.sha256(data).hexdigest()[:16] == sha, rel


def test_names_dir_is_inside_the_package() -> None:
    assert os.path.dirname(names_mod.__file__) == os.path.dirname(NAMES_DIR)
