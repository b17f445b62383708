"""Protocol files are checked against their task's typed schema when they are loaded.

Each failure is one ConfigError naming the file, the key and what was expected (for an unknown key, the
nearest valid one). The cases below edit a shipped protocol in one place and check the message.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import os
import typing
from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple

import pytest
import yaml

from harness.errors import ConfigError
from harness.protocols import HERE, load_protocol_file
from harness.protocols.schema import check_value, fields_of, schema_for, schema_tasks

SHIPPED = sorted(glob.glob(os.path.join(HERE, "*", "*.yaml")))


def _raw(task: str, pid: str) -> dict:
    with open(os.path.join(HERE, task, f"{pid}.yaml")) as f:
        return yaml.safe_load(f)


def _write(tmp_path, data: dict, name: str = "proto.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _load_error(tmp_path, data: dict) -> str:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_protocol_file(path)
    assert path in str(e.value)  # every message names the file
    return str(e.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: "/".join(p.split(os.sep)[-2:]))
def test_every_shipped_protocol_loads_through_its_schema(path):
    p = load_protocol_file(path)
    schema = schema_for(p.task, path)
    for ds in p.datasets:
        s = p.settings(ds)
        members = typing.get_args(schema.settings) or (schema.settings,)
        chosen = [m for m in members if set(f.name for f in dataclasses.fields(m)) == set(s)]
        assert len(chosen) == 1, (p.key, ds, sorted(s))  # complete: exactly the keys of one settings type
        assert s["precision"] == "fp32"  # every shipped protocol states the reference precision
        with open(path) as f:
            assert "precision: fp32" in f.read()


def test_the_three_tasks_have_schemas():
    assert {"ovss", "linear-seg", "depth"} <= set(schema_tasks())


def test_misspelled_key_names_the_nearest_valid_one(tmp_path):
    data = _raw("ovss", "phreg")
    data["defaults"]["logit_scael"] = data["defaults"].pop("logit_scale")
    msg = _load_error(tmp_path, data)
    assert "defaults.logit_scael" in msg and "did you mean 'logit_scale'" in msg and "valid keys" in msg


def test_misspelled_key_in_a_dataset_entry_and_in_a_nested_mapping(tmp_path):
    data = _raw("ovss", "sclip")
    data["datasets"]["voc21"]["are_thd"] = 0.1
    msg = _load_error(tmp_path, data)
    assert "datasets.voc21.are_thd" in msg and "did you mean 'area_thd'" in msg
    data = _raw("linear-seg", "faithful")
    data["defaults"]["optimizer"]["weight_decy"] = data["defaults"]["optimizer"].pop("weight_decay")
    msg = _load_error(tmp_path, data)
    assert "optimizer.weight_decy" in msg and "did you mean 'weight_decay'" in msg


def test_misspelled_top_level_key(tmp_path):
    data = _raw("depth", "fast")
    data["descripton"] = data.pop("description")
    msg = _load_error(tmp_path, data)
    assert "descripton" in msg and "did you mean 'description'" in msg


def test_missing_key_is_named_with_the_dataset(tmp_path):
    data = _raw("ovss", "phreg")  # resize is given per dataset only
    del data["datasets"]["ade20k"]["resize"]
    msg = _load_error(tmp_path, data)
    assert "datasets.ade20k" in msg and "missing key(s) resize" in msg
    data = _raw("depth", "faithful")
    del data["defaults"]["loss"]["log_eps"]
    msg = _load_error(tmp_path, data)
    assert "loss" in msg and "missing key(s) log_eps" in msg


def test_missing_mode_says_which_values_choose_the_keys(tmp_path):
    data = _raw("depth", "fast")
    del data["defaults"]["mode"]
    msg = _load_error(tmp_path, data)
    assert "datasets.nyu: missing key(s) mode (one of 'faithful', 'fast'" in msg, msg


def test_missing_top_level_key(tmp_path):
    data = _raw("linear-seg", "fast")
    del data["source"]
    assert "missing key(s) source" in _load_error(tmp_path, data)


@pytest.mark.parametrize("task,pid,edit,expect", [
    ("ovss", "phreg", ("defaults", "crop", "336"), "defaults.crop: expected an integer, got '336'"),
    ("ovss", "phreg", ("defaults", "precision", "fp16"), "'fp16' is not allowed; expected one of 'fp32', 'bf16'"),
    ("ovss", "naclip", ("defaults", "pamr", {"steps": 10}), "missing key(s) dilations"),
    ("ovss", "sclip", ("datasets.voc21", "logit_scale", "65"), "datasets.voc21.logit_scale: expected a number"),
    ("linear-seg", "faithful", ("defaults", "crop_size", [512]), "expected a list of 2 values"),
    ("linear-seg", "faithful", ("defaults", "photometric", 1), "expected true or false"),
    ("linear-seg", "fast", ("defaults", "mode", "quick"), "'quick' is not allowed; expected one of 'faithful', 'fast'"),
    ("linear-seg", "fast", ("defaults", "select_metric", "miou"), "expected one of 'mIoU', 'mAcc', 'aAcc'"),
    ("depth", "faithful", ("defaults.optimizer", "lr", "5e-3"), "YAML reads 1e-3 as text: write 1.0e-3"),
    ("depth", "faithful", ("defaults.schedule", "policy", "step"), "expected one of 'poly', 'cosine'"),
    ("depth", "fast", ("defaults", "max_iters", 40.5), "defaults.max_iters: expected an integer"),
])
def test_wrong_type_or_value_names_key_and_expectation(tmp_path, task, pid, edit, expect):
    data = _raw(task, pid)
    where, key, value = edit
    node = data
    for part in where.split("."):
        node = node[part]
    node[key] = value
    msg = _load_error(tmp_path, data)
    assert expect in msg, msg


def test_mode_specific_keys_follow_the_mode(tmp_path):
    # the fast linear-seg protocol switched to faithful lacks the faithful augmentation keys and has fast ones
    data = _raw("linear-seg", "fast")
    data["defaults"]["mode"] = "faithful"
    msg = _load_error(tmp_path, data)
    assert "holdout_fraction" in msg and "unknown key" in msg


def test_cross_key_checks(tmp_path):
    data = _raw("ovss", "phreg")
    data["defaults"]["stride"] = 400
    assert "stride 400 exceeds crop 336" in _load_error(tmp_path, data)
    data = _raw("depth", "fast")
    data["defaults"]["holdout_fraction"] = 1.0
    assert "holdout_fraction must be in (0, 1)" in _load_error(tmp_path, data)


def test_unknown_task_is_a_clear_error(tmp_path):
    data = _raw("ovss", "phreg")
    data["task"] = "ovs"
    msg = _load_error(tmp_path, data)
    assert "task 'ovs' has no protocol schema" in msg and "did you mean 'ovss'" in msg and "schema_" in msg


def test_precision_may_be_omitted_and_means_fp32(tmp_path):
    data = _raw("ovss", "phreg")
    del data["defaults"]["precision"]
    p = load_protocol_file(_write(tmp_path, data))
    assert p.settings("voc21")["precision"] == "fp32"


def test_settings_are_checked_values_with_ints_as_floats(tmp_path):
    p = load_protocol_file(os.path.join(HERE, "ovss", "phreg.yaml"))
    s = p.settings("voc21")
    assert s["logit_scale"] == 40.0 and isinstance(s["logit_scale"], float)
    assert s["resize"] == 448 and isinstance(s["resize"], int)
    s["crop"] = -1  # a copy: the protocol is not changed
    assert p.settings("voc21")["crop"] == 336


# -- the checker on hand-written types (independent of the shipped files) ---------------------------


@dataclass(frozen=True)
class _Inner:
    kind: Literal["a"]
    n: int


@dataclass(frozen=True)
class _Other:
    kind: Literal["b"]
    x: float


@dataclass(frozen=True)
class _Outer:
    size: Tuple[int, int]
    names: List[str]
    maybe: Optional[float]
    flag: bool
    part: typing.Union[_Inner, _Other]
    level: int = 3


def test_checker_on_a_hand_written_schema():
    ok = check_value({"size": [2, 3], "names": ["p"], "maybe": None, "flag": False, "part": {"kind": "b", "x": 1}},
                     _Outer, "f.yaml", "")
    assert ok == {"size": [2, 3], "names": ["p"], "maybe": None, "flag": False, "part": {"kind": "b", "x": 1.0},
                  "level": 3}
    assert isinstance(ok["part"]["x"], float)
    bad = [
        ({"size": [2, 3, 4]}, "size: expected a list of 2 values"),
        ({"size": [2, True]}, "size[1]: expected an integer, got True"),
        ({"names": "p"}, "names: expected a list of str"),
        ({"maybe": "x"}, "maybe: expected a number, got 'x' (or null)"),
        ({"flag": 0}, "flag: expected true or false"),
        ({"part": {"kind": "c"}}, "part.kind: 'c' is not allowed; expected one of 'a', 'b'"),
        ({"part": {"n": 1}}, "part: missing key(s) kind"),
        ({"part": {"kind": "a", "x": 1.0}}, "part.x: unknown key 'x'"),
        ({"levle": 2}, "levle: unknown key 'levle'; did you mean 'level'?"),
    ]
    base = {"size": [2, 3], "names": [], "maybe": 0.5, "flag": True, "part": {"kind": "a", "n": 1}}
    for change, expect in bad:
        with pytest.raises(ConfigError) as e:
            check_value({**copy.deepcopy(base), **change}, _Outer, "f.yaml", "")
        assert str(e.value).startswith("protocol file f.yaml: ") and expect in str(e.value), (change, str(e.value))
    assert fields_of(typing.Union[_Inner, _Other]) == ["kind", "n", "x"]


def test_depth_select_metrics_are_the_accumulators():
    from harness.metrics.depth import DEPTH_METRICS
    from harness.protocols.schema_depth import DepthFast

    assert set(typing.get_args(typing.get_type_hints(DepthFast)["select_metric"])) == set(DEPTH_METRICS)
