"""The ``ovss/clearclip`` protocol is mc-lan/ClearCLIP's own configs, on all eight datasets.

Expected values, copied by hand from github.com/mc-lan/ClearCLIP @ ad68a404d55d48d27330b93554eb64a234ff717f:
``clearclip_segmentor.py`` defaults (prob_thd=0.0, logit_scale=50, slide_stride=224, slide_crop=448) and
``configs/cfg_<dataset>.py`` (Resize scale=(2048, 448); prob_thd 0.5 VOC21, 0.15 Context-60, 0.4 COCO-Object;
slide_crop=224 for Cityscapes).
"""
from __future__ import annotations

import pytest

from harness.protocols import get_protocol
from harness.registry import DATASETS
from harness.text.names import check_class_count, load_name_set

# dataset: (resize, crop, stride, prob_thd, name file of configs/cfg_<dataset>.py)
CONFIGS = {
    "voc21": (448, 448, 224, 0.5, "voc21"),
    "voc20": (448, 448, 224, 0.0, "voc20"),
    "context60": (448, 448, 224, 0.15, "context60"),
    "context59": (448, 448, 224, 0.0, "context59"),
    "coco_object": (448, 448, 224, 0.4, "coco_object"),
    "coco_stuff164k": (448, 448, 224, 0.0, "coco_stuff"),
    "cityscapes": (448, 224, 224, 0.0, "cityscapes"),
    "ade20k": (448, 448, 224, 0.0, "ade20k"),
}


@pytest.fixture(scope="module")
def proto():
    return get_protocol("ovss", "clearclip")


def test_covers_the_eight_datasets(proto):
    assert set(proto.datasets) == set(CONFIGS)
    assert proto.task == "ovss" and not proto.default_for_task
    assert "ad68a404d55d48d27330b93554eb64a234ff717f" in proto.source and "arXiv:2407.12442" in proto.source


@pytest.mark.parametrize("dataset", list(CONFIGS))
def test_matches_the_repository_configs(proto, dataset):
    s = proto.settings(dataset)
    resize, crop, stride, prob_thd, name_key = CONFIGS[dataset]
    assert (s["resize"], s["max_long_side"], s["crop"], s["stride"]) == (resize, 2048, crop, stride)
    assert s["mode"] == "slide" and s["logit_scale"] == 50 and s["prob_thd"] == prob_thd
    assert s["area_thd"] is None and not s["pamr"]
    assert s["name_set"] == "clearclip" and s["templates"] == "openai_imagenet_80"
    spec = DATASETS.get(dataset)
    assert spec.key == name_key
    names = load_name_set(s["name_set"], spec.key)
    check_class_count(names, spec.num_classes, dataset)
    # with-background datasets: line 0 is ClearCLIP's single word `background`, reached through prob_thd
    assert (names[0] == ["background"]) == (prob_thd > 0)


def test_cli_runs_clearclip_protocol_on_generated_context60(tmp_path, monkeypatch):
    """One real run: ClearCLIP method + clearclip protocol (448 px, 80 templates) on a 60-class dataset."""
    from harness.cli import main
    from harness.results.record import load_records
    from harness.synthetic.segmentation import write_synthetic_dataset

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    root = write_synthetic_dataset("context60", str(tmp_path / "data"), num_images=1, size=(48, 64), seed=3)
    rc = main(["run", "ovss", "--backbone", "test-planted-clip", "--random-init", "--method", "clearclip",
               "--protocol", "clearclip", "--dataset", "context60", "--data-root", root, "--workers", "0",
               "--results-dir", str(tmp_path / "results"), "--no-progress"])
    assert rc == 0
    (rec,) = load_records(str(tmp_path / "results"))
    assert rec.protocol == "clearclip" and rec.num_images == 1
    assert rec.protocol_version == 1
    settings = rec.settings
    assert settings["prob_thd"] == 0.15 and settings["name_set"] == "clearclip" and settings["resize"] == 448
    assert len(rec.per_class) == 60
