"""`harness run ovss` end to end on generated data in the real layouts, checked against mmseg's IoUMetric.

The reference side is independent of the harness pipeline: ground truth is read from the raw label
PNGs with Pillow and ``reduce_zero_label`` is applied by hand (0 -> 255, then -1), and the metric is
mmseg's own ``IoUMetric`` fed with the prediction PNGs the run saved.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from harness.cli import main
from harness.registry import DATASETS
from harness.results.record import load_records

# a protocol small enough for CPU tests: same code path as phreg, tiny resolution, one template
TEST_PROTOCOL = {
    "id": "test-small", "version": 1, "task": "ovss", "description": "tiny CPU protocol for tests",
    "source": "tests", "defaults": {"mode": "slide", "crop": 64, "stride": 32, "max_long_side": 2048,
                                    "resize": 72, "logit_scale": 40, "prob_thd": 0.0, "area_thd": None,
                                    "pamr": None, "name_set": "sclip", "templates": "test_one"},
    "datasets": {"voc21": {"prob_thd": 0.1}, "voc20": {}, "context59": {"mode": "whole"},
                 "ade20k": {"area_thd": 0.05}},
}


@pytest.fixture()
def one_template(monkeypatch):
    from harness.text import templates

    monkeypatch.setitem(templates.TEMPLATE_SETS, "test_one", ["a photo of a {}."])


def _mmseg_reference(pred_dir: str, spec, root: str, split: str = "val"):
    from harness.compat.mmcv_ops import import_mmseg

    import_mmseg()
    from mmseg.evaluation import IoUMetric

    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": spec.class_names}
    lay = spec.split(split)
    for img_id in spec.image_ids(root, split):
        raw = np.array(Image.open(os.path.join(root, lay.ann_dir, img_id + spec.seg_map_suffix)))
        gt = raw.astype(np.int64)
        if spec.reduce_zero_label:  # by hand, as mmseg's LoadAnnotations does
            gt[gt == 0] = 255
            gt = gt - 1
            gt[gt == 254] = 255
        pred = np.array(Image.open(os.path.join(pred_dir, os.path.basename(img_id) + ".png"))).astype(np.int64)
        assert pred.shape == gt.shape
        metric.process({}, [{"pred_sem_seg": {"data": torch.from_numpy(pred)[None]},
                             "gt_sem_seg": {"data": torch.from_numpy(gt)[None]}}])
    return metric.compute_metrics(metric.results)


@pytest.mark.parametrize("dataset", ["voc21", "voc20", "context59", "ade20k"])
def test_run_matches_mmseg_iou_metric(dataset, tmp_path, one_template, monkeypatch):
    from harness.synthetic.segmentation import write_synthetic_dataset

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    root = write_synthetic_dataset(dataset, str(tmp_path / "data"), num_images=3, size=(60, 80), seed=1)
    proto = tmp_path / "proto.yaml"
    proto.write_text(yaml.safe_dump(TEST_PROTOCOL))
    preds = tmp_path / "preds"
    rc = main(["run", "ovss", "--backbone", "clip-b16-openai", "--method", "naclip", "--dataset", dataset,
               "--data-root", root, "--random-init", "--protocol", str(proto), "--workers", "0",
               "--results-dir", str(tmp_path / "results"), "--save-predictions", str(preds), "--no-progress"])
    assert rc == 0
    (rec,) = load_records(str(tmp_path / "results"))
    spec = DATASETS.get(dataset)
    ref = _mmseg_reference(str(preds), spec, root)
    assert rec.num_images == 3 and rec.protocol == "test-small" and rec.weights == "random-init"
    # mmseg rounds to 2 decimals
    for k in ("mIoU", "mAcc", "aAcc"):
        assert abs(round(rec.metrics[k], 2) - ref[k]) < 1e-6, (k, rec.metrics[k], ref[k])
    if spec.reduce_zero_label:
        assert len(rec.per_class) == spec.num_classes


def test_rerun_skips_finished_record_and_force_recomputes(tmp_path, one_template, monkeypatch):
    from harness.synthetic.segmentation import write_synthetic_dataset

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    root = write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=2, size=(60, 80))
    proto = tmp_path / "proto.yaml"
    proto.write_text(yaml.safe_dump(TEST_PROTOCOL))
    args = ["run", "ovss", "--backbone", "clip-b16-openai", "--method", "clip,maskclip", "--dataset", "voc21",
            "--data-root", root, "--random-init", "--protocol", str(proto), "--workers", "0",
            "--results-dir", str(tmp_path / "results"), "--no-progress"]
    assert main(args) == 0
    recs = {r.method: r for r in load_records(str(tmp_path / "results"))}
    assert set(recs) == {"vanilla", "maskclip"}
    created = recs["vanilla"].created
    assert main(args) == 0  # finished: records are read back, not recomputed
    again = {r.method: r for r in load_records(str(tmp_path / "results"))}
    assert again["vanilla"].created == created and len(again) == 2
    assert recs["vanilla"].settings["methods_in_pass"] == ["vanilla", "maskclip"]  # one shared pass
    assert main(args[:-1] + ["--force", "--no-progress"]) == 0
    forced = {r.method: r for r in load_records(str(tmp_path / "results"))}
    assert forced["vanilla"].created >= created and forced["vanilla"].settings["text_cache_hit"] is True
    assert forced["vanilla"].metrics == recs["vanilla"].metrics


@pytest.fixture()
def sclip_run(tmp_path, one_template, monkeypatch):
    """`harness run` arguments (by results folder) for sclip on 4 synthetic VOC images, one image per step."""
    from harness.evaluators import ovss
    from harness.synthetic.segmentation import write_synthetic_dataset

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ovss, "IMAGES_PER_STEP", 1)
    root = write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=4, size=(60, 80), seed=3)
    proto = tmp_path / "proto.yaml"
    proto.write_text(yaml.safe_dump(TEST_PROTOCOL))

    def args(results):
        return ["run", "ovss", "--backbone", "clip-b16-openai", "--method", "sclip", "--dataset", "voc21",
                "--data-root", root, "--random-init", "--protocol", str(proto), "--workers", "0",
                "--results-dir", str(tmp_path / results), "--no-progress"]

    return args


def _patch_postprocess(monkeypatch, interrupt_at=None):
    """Count post-processing calls (one per image here); raise Ctrl-C at call ``interrupt_at``."""
    from harness.evaluators import ovss
    from harness.ovss.inference import postprocess as real

    seen = {"n": 0}

    def patched(*a, **k):
        seen["n"] += 1
        if seen["n"] == interrupt_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ovss, "postprocess", patched)
    return seen


def _partials(folder):
    return [f for _, _, fs in os.walk(folder) for f in fs if ".partial-" in f]


def test_interrupted_run_resumes_from_partial_state(tmp_path, sclip_run, monkeypatch):
    """Ctrl-C mid-run keeps a partial accumulator; the next run continues and ends with the same numbers."""
    assert main(sclip_run("clean")) == 0
    (clean,) = load_records(str(tmp_path / "clean"))
    _patch_postprocess(monkeypatch, interrupt_at=3)
    assert main(sclip_run("resumed")) == 130
    assert len(_partials(tmp_path / "resumed")) == 1
    seen = _patch_postprocess(monkeypatch)
    assert main(sclip_run("resumed")) == 0
    assert seen["n"] == 2  # only the two images not finished before the interrupt
    (resumed,) = load_records(str(tmp_path / "resumed"))
    assert resumed.metrics == clean.metrics
    assert not _partials(tmp_path / "resumed")


def test_partial_state_of_another_world_size_is_not_resumed(tmp_path, sclip_run, monkeypatch):
    """A partial counts images of its rank's shard: resumed under another world size it would skip some images
    and count others twice, so the run starts its shard over instead."""
    from harness.evaluators import ovss
    from harness.runtime import Dist

    _patch_postprocess(monkeypatch, interrupt_at=3)  # single process: interrupted after images 0 and 1 (done=2)
    assert main(sclip_run("resumed")) == 130
    # rank 0 of 2 (shard = images 0 and 2); no process group, so all_reduce is a no-op: the record is rank 0's shard
    monkeypatch.setattr(ovss, "init_distributed", lambda: Dist(rank=0, world_size=2))
    seen = _patch_postprocess(monkeypatch)
    assert main(sclip_run("resumed")) == 0
    assert seen["n"] == 2  # both images of the shard, not "done=2 of the single-process order"
    (resumed,) = load_records(str(tmp_path / "resumed"))
    assert main(sclip_run("clean")) == 0
    (clean,) = load_records(str(tmp_path / "clean"))
    assert resumed.metrics == clean.metrics and resumed.per_class == clean.per_class
