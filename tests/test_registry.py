"""Registries (harness/registry.py) and protocol files (harness/protocols/).

Duplicates and alias collisions fail at registration; unknown names suggest the nearest ones; every
registered method builds on a random-init CLIP; every backbone spec and protocol file is complete and
consistent with the dataset registry and the text-side data (name files, template sets).
"""
from __future__ import annotations

import os

import pytest
import torch

from harness.registry import BACKBONE_FAMILIES, BACKBONES, DATASETS, EVALUATORS, METHODS, Registry, RegistryError


# -- registration ---------------------------------------------------------------------------------
class A:
    pass


class B:
    pass


def fresh() -> Registry:
    reg: Registry = Registry("widget")
    reg.add("alpha", A, aliases=("a", "first"))
    return reg


@pytest.mark.parametrize("name,aliases", [
    ("alpha", ()),  # same name
    ("a", ()),  # name equal to an existing alias
    ("beta", ("alpha",)),  # alias equal to an existing name
    ("beta", ("first",)),  # alias equal to an existing alias
])
def test_duplicates_and_alias_collisions_raise(name, aliases):
    reg = fresh()
    with pytest.raises(RegistryError, match="duplicate widget name") as exc:
        reg.add(name, B, aliases=aliases)
    assert "A" in str(exc.value)  # names who registered it first
    # nothing of the failed registration was kept
    assert reg.names() == ["alpha"] and "beta" not in reg
    assert reg.get("a") is A and reg.get("first") is A


def test_decorator_registration_and_duplicate():
    reg = fresh()

    @reg.register("gamma", aliases=("g",))
    class C:
        """Gamma widget. More text."""

    assert reg.get("g") is C and C.registry_name == "gamma"
    assert reg.aliases_of("gamma") == ["g"]
    with pytest.raises(RegistryError):
        @reg.register("g")
        class D:
            pass


@pytest.fixture
def restore_registries():
    """Discover every entry first (``add`` does not), and undo anything a failing test registered."""
    regs = (METHODS, BACKBONES, DATASETS)
    saved = []
    for reg in regs:
        reg.names()
        saved.append((dict(reg._entries), dict(reg._aliases)))
    yield
    for reg, (entries, aliases) in zip(regs, saved):
        reg._entries.clear()
        reg._entries.update(entries)
        reg._aliases.clear()
        reg._aliases.update(aliases)


def test_real_registries_reject_duplicates(restore_registries):
    with pytest.raises(RegistryError, match="duplicate method name 'clip'"):
        METHODS.add("clip", B)
    with pytest.raises(RegistryError, match="duplicate method name 'vanilla'"):
        METHODS.add("plain", B, aliases=("vanilla",))
    with pytest.raises(RegistryError, match="duplicate backbone name"):
        BACKBONES.add("clip-b16-openai", B)
    with pytest.raises(RegistryError, match="duplicate dataset name"):
        DATASETS.add("coco_stuff", B)  # an alias
    assert "plain" not in METHODS and METHODS.get("clip") is not B


# -- lookup -------------------------------------------------------------------------------------
@pytest.mark.parametrize("reg,wrong,nearest", [
    (METHODS, "naclp", "naclip"),
    (METHODS, "sclp", "sclip"),
    (BACKBONES, "clip-b16-opnai", "clip-b16-openai"),
    (BACKBONES, "dinov2-reg4-b16", "dinov2-reg4-b14"),
    (DATASETS, "voc211", "voc21"),
    (DATASETS, "ade20", "ade20k"),
    (EVALUATORS, "ovs", "ovss"),
])
def test_unknown_names_suggest_nearest(reg, wrong, nearest):
    with pytest.raises(RegistryError) as exc:
        reg.get(wrong)
    msg = str(exc.value)
    assert not msg.startswith('"')  # verbatim, not KeyError's repr
    assert f"unknown {reg.kind} {wrong!r}" in msg
    assert "Did you mean" in msg and nearest in msg
    assert f"harness list {reg.kind}s" in msg


def test_unknown_protocol_suggests_nearest():
    from harness.protocols import get_protocol

    with pytest.raises(RegistryError, match="ovss/phreg"):
        get_protocol("ovss", "phrg")


def test_far_off_name_has_no_suggestion():
    with pytest.raises(RegistryError) as exc:
        METHODS.get("zzzzzzzzzzzz")
    assert "Did you mean" not in str(exc.value)


def test_aliases_resolve():
    assert METHODS.canonical("clip") == "vanilla"
    assert METHODS.get("vanilla") is METHODS.get("clip")
    assert "clip" in METHODS and "clip" not in METHODS.names()
    assert DATASETS.canonical("coco_stuff") == "coco_stuff164k"
    assert type(DATASETS.get("coco_stuff")) is type(DATASETS.get("coco_stuff164k"))  # instantiated specs


# -- methods and backbones ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_backbone():
    from harness.models import build_dense_model

    model = build_dense_model("clip-b16-openai", "vanilla", random_init=True)
    assert model.describe()["method"] == "vanilla"
    return model.backbone


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_builds_on_random_init_clip(method, clip_backbone):
    from harness.models import attach_method

    if METHODS.get(method).WEIGHTS == "required":
        pytest.skip(f"{method} needs --method-weights; its own tests build it")
    model = attach_method(clip_backbone, method)
    assert model.describe()["method"] == method
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        feats = model.forward_dense(x)
    assert feats.patch.shape == (1, 512, 2, 3) and feats.cls.shape == (1, 512)
    assert torch.isfinite(feats.patch).all()


@pytest.mark.parametrize("backbone_id", BACKBONES.names())
def test_every_backbone_spec_is_complete(backbone_id):
    spec = BACKBONES.get(backbone_id)
    assert spec.id == backbone_id
    assert isinstance(spec.patch_size, int) and spec.patch_size > 0
    assert isinstance(spec.native_size, int) and spec.native_size % spec.patch_size == 0
    for stats in (spec.mean, spec.std):
        assert len(stats) == 3 and all(0.0 < v < 1.0 for v in stats)
    assert spec.family in BACKBONE_FAMILIES
    assert hasattr(BACKBONE_FAMILIES.get(spec.family), "build")
    assert spec.arch and spec.description
    assert spec.num_registers >= 0
    if spec.has_text:
        # planted: an OpenCLIPBackbone subclass; open_clip-checkpoint (LaSt-ViT): an OpenCLIPBackbone from a file
        assert spec.family in ("open_clip", "planted_clip", "open_clip-checkpoint")
    if not backbone_id.startswith("test-"):  # real backbones say where their weights live
        assert spec.hf_hub or spec.url


# -- protocols ----------------------------------------------------------------------------------
def protocol_files():
    from harness.protocols import HERE

    out = []
    for task in sorted(os.listdir(HERE)):
        d = os.path.join(HERE, task)
        if os.path.isdir(d) and not task.startswith("_"):
            out += [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith((".yaml", ".yml"))]
    return out


OVSS_KEYS = ("mode", "crop", "stride", "max_long_side", "resize", "logit_scale", "prob_thd", "area_thd", "pamr",
             "name_set", "templates")


def test_there_are_protocol_files():
    assert any(p.endswith(os.path.join("ovss", "phreg.yaml")) for p in protocol_files())


@pytest.mark.parametrize("path", protocol_files(), ids=lambda p: "/".join(p.split(os.sep)[-2:]))
def test_protocol_file_loads_and_is_consistent(path):
    import yaml

    from harness.protocols import REQUIRED, load_protocol_file

    with open(path) as f:
        raw = yaml.safe_load(f)
    assert all(k in raw for k in REQUIRED), [k for k in REQUIRED if k not in raw]
    p = load_protocol_file(path)
    task = os.path.basename(os.path.dirname(path))
    assert p.task == task and p.id == os.path.splitext(os.path.basename(path))[0]
    assert p.version >= 1 and p.description and p.source
    assert task in EVALUATORS
    assert p.datasets
    for ds in p.datasets:
        assert ds in DATASETS.names(), f"{p.key}: {ds!r} is not a registered dataset name"
        settings = p.settings(ds)
        if task == "ovss":
            check_ovss_settings(p.key, ds, settings)


def check_ovss_settings(key, ds, s):
    from harness.text.names import check_class_count, load_name_set
    from harness.text.templates import TEMPLATE_SETS

    missing = [k for k in OVSS_KEYS if k not in s]
    assert not missing, (key, ds, missing)
    assert s["mode"] in ("slide", "whole")
    assert int(s["crop"]) > 0 and 0 < int(s["stride"]) <= int(s["crop"])
    assert int(s["resize"]) > 0 and float(s["logit_scale"]) > 0 and 0 <= float(s["prob_thd"] or 0) < 1
    assert s["templates"] in TEMPLATE_SETS, (key, ds)
    spec = DATASETS.get(ds)
    names = load_name_set(s["name_set"], spec.key)  # raises ConfigError when the file is missing
    check_class_count(names, spec.num_classes, f"{key} {ds}")


def test_every_task_with_protocols_has_one_default():
    from harness.protocols import get_protocol, list_protocols

    tasks = {p.task for p in list_protocols()}
    assert "ovss" in tasks
    for task in tasks:
        defaults = [p for p in list_protocols(task) if p.default_for_task]
        assert len(defaults) == 1, (task, [p.id for p in defaults])
        assert get_protocol(task) is defaults[0]
    assert get_protocol("ovss").id == "phreg"
