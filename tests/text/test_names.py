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

# class counts per dataset (mmseg dataset classes as configured in wangf3014/SCLIP@b56bd30 configs/cfg_*.py)
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
    with pytest.raises(ConfigError, match=r"no file for 'nyu'.*clearclip: ade20k, cityscapes"):
        load_name_set("clearclip", "nyu")


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


# Full sha256 of each ClearCLIP name file, computed from the git blobs of
# github.com/mc-lan/ClearCLIP @ ad68a404d55d48d27330b93554eb64a234ff717f, configs/cls_<name>.txt.
CLEARCLIP_SHA256 = {
    "voc21": ("265d9ede93be451d724981c5ffde13a8eb3082674e98021aa8d5445f81f4498a", 139),
    "voc20": ("6b9a85ffb907e34ac920d704a520b45e1424bf96796ca7de5b1823ee202db119", 128),
    "context60": ("5e620446a8699f292a4c2e37fa8918a33dd4f14713dc1b3f22884d2be68b45a1", 390),
    "context59": ("cd808465f06a16169edc25580073f0eda347e64f06cc1c2e24acd0b237f6497d", 378),
    "coco_object": ("1f17b53017e442257cad2025ab981ddeb28d048af00dcac8ae810bc25a6a9a77", 631),
    "coco_stuff": ("fb98709b9ab1baff4fd930bac4a77772a0458c7d534911de545f9a4081e14a3e", 1374),
    "cityscapes": ("6f6782fc1bf92bfd9f5562192e92045e0e093870e613f387f6c98fc66d4ceba4", 138),
    "ade20k": ("e53ded02c488bdb903ef000a2d207e4ac4f2bb4502a72572e4aab7c2504aef3a", 1103),
}


@pytest.mark.parametrize("key", sorted(CLEARCLIP_SHA256))
def test_clearclip_files_match_the_repository_bytes(key: str) -> None:
    with open(name_file_path("clearclip", key), "rb") as f:
        data = f.read()
    sha, size = CLEARCLIP_SHA256[key]
    assert len(data) == size and hashlib.sha256(data).hexdigest() == sha


def test_all_clearclip_keys_present_with_dataset_class_counts() -> None:
    assert available_name_sets()["clearclip"] == sorted(SCLIP_COUNTS)
    for key, n in SCLIP_COUNTS.items():
        names = load_name_set("clearclip", key)
        check_class_count(names, n, f"clearclip/{key}")
        assert all(len(cls) == 1 for cls in names), key  # no file has a comma: one name per class


def test_clearclip_background_and_plain_names() -> None:
    for key in ("voc21", "context60", "coco_object"):
        assert load_name_set("clearclip", key)[0] == ["background"], key
    voc21 = load_name_set("clearclip", "voc21")
    assert load_name_set("clearclip", "voc20") == voc21[1:]
    obj = load_name_set("clearclip", "coco_object")
    assert obj[1] == ["person"] and obj[10] == ["traffic light"] and obj[-1] == ["toothbrush"]
    assert load_name_set("clearclip", "context60")[-1] == ["wood "]  # the trailing space survives here too
    assert load_name_set("clearclip", "context60")[1:] == load_name_set("clearclip", "context59")[:-1] + [["wood "]]


def test_clearclip_separator_does_not_split_sclip_style_lines() -> None:
    # ClearCLIP's get_cls_idx splits on ',' and keeps the space: 'a, b' -> ['a', ' b'] (hand-computed)
    assert names_mod.parse_name_lines(["a, b\n", "c"], SEPARATORS["clearclip"]) == [["a", " b"], ["c"]]
    assert names_mod.parse_name_lines(["a, b\n", "c"], SEPARATORS["sclip"]) == [["a", "b"], ["c"]]
