"""Linear-seg evaluator end to end on generated VOC-layout data with a tiny random ViT (CPU).

Covers the acceptance criteria: the fast probe learns (mIoU >= 90 on colour-coded classes), records say
``fast``/``faithful`` with the protocol id and version, finished runs are skipped, and a run killed
mid-training resumes to the same metrics as an uninterrupted one (fast and faithful).
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from harness.errors import ConfigError, DataError
from harness.evaluators.base import RunConfig
from harness.metrics.segmentation import IoUAccumulator
from harness.probes.trainer import SimulatedKill
from harness.protocols import get_protocol
from harness.registry import EVALUATORS

from .helpers import scaled_protocol


def scaled_protocol_t(path, base, new_id, **overrides):
    return scaled_protocol(path, "linear-seg", base, new_id, **overrides)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """40 train / 12 val images in the VOC2012 layout with the demo's 4 colour-coded classes + background.

    The datasets helper's VOC writer is used with its class subset (as ``write_demo_voc`` does), so the
    classes are recoverable from a random backbone's features with few images.
    """
    from harness.synthetic.segmentation import write_demo_voc

    root = str(tmp_path_factory.mktemp("voc"))
    data_root = write_demo_voc(root, 40, (96, 128), 0, "train")
    write_demo_voc(root, 12, (96, 128), 0, "val")
    return data_root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def config(data_root: str, protocol: str, results: str, cache: str, **kw) -> RunConfig:
    return RunConfig(task="linear-seg", backbone="test-vit-tiny", method="vanilla", dataset="voc21",
                     data_root=data_root, protocol=protocol, random_init=True, results_dir=results, cache_dir=cache,
                     num_workers=0, progress=False, **kw)


FAST_SMALL = dict(test_scale=[448, 112], crop_size=[112, 112], slide_crop=[112, 112], slide_stride=[75, 75],
                  batch_size=8, holdout_fraction=0.2, eval_interval=50, checkpoint_interval=25, log_interval=10,
                  schedule={"policy": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 10, "warmup_ratio": 1e-6})


def test_shipped_protocols_hold_the_reference_recipe() -> None:
    f = get_protocol("linear-seg", "faithful")
    s = f.settings("voc21")
    assert f.default_for_task and s["mode"] == "faithful" and f.version >= 1
    assert s["optimizer"]["lr"] == 1e-3 and s["optimizer"]["weight_decay"] == 1e-4
    assert s["schedule"] == {"policy": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 1500, "warmup_ratio": 1e-6,
                             "momentum": "none"}
    assert (s["max_iters"], s["batch_size"], s["crop_size"], s["slide_crop"], s["slide_stride"]) == \
        (40000, 16, [512, 512], [512, 512], [341, 341])
    assert (s["train_scale"], s["ratio_range"], s["cat_max_ratio"], s["flip_prob"]) == \
        ([2048, 512], [0.5, 2.0], 0.75, 0.5)
    assert set(f.datasets) == {"voc21", "ade20k", "cityscapes"}
    assert f.settings("cityscapes")["test_scale"] == [2048, 1024]
    fast = get_protocol("linear-seg", "fast")
    assert fast.id == "fast" and fast.settings("ade20k")["mode"] == "fast"
    assert len(fast.defaults["optimizer"]["lrs"]) > 1


def test_fast_probe_learns_colour_coded_classes(voc, cache_dir, tmp_path) -> None:
    proto = scaled_protocol_t(tmp_path / "fast-small.yaml", "fast", "fast-small", max_iters=100,
                            optimizer={"type": "AdamW", "lrs": [0.1, 0.3], "weight_decay": 1e-4,
                                       "betas": [0.9, 0.999], "grad_clip": None}, **FAST_SMALL)
    results = str(tmp_path / "results")
    rec = EVALUATORS.get("linear-seg")().run(config(voc, proto, results, cache_dir))
    assert rec.metrics["mIoU"] >= 90.0, (rec.metrics, rec.settings["heldout"])
    assert set(rec.metrics) == {"mIoU", "mAcc", "aAcc"} and rec.metrics["aAcc"] > 90
    assert rec.task == "linear-seg" and rec.protocol == "fast-small" and rec.protocol_version == 2
    assert rec.settings["mode"] == "fast" and any("fast protocol (not faithful)" in n for n in rec.notes)
    assert rec.dataset == "voc21" and rec.split == "val" and rec.num_images == 12 and rec.weights == "random-init"
    assert set(rec.per_class) >= {"background", "car", "cat", "dog", "person"}
    assert rec.settings["selected_lr"] in (0.1, 0.3) and set(rec.settings["heldout"]) == {"lr=0.1", "lr=0.3"}
    assert rec.settings["token_grid_train"] == [8, 8]
    for key in ("curves_csv", "curves_png", "head"):
        assert os.path.isfile(rec.settings["artifacts"][key]), key
    stem = rec.settings["artifacts"]["head"][: -len(".head.pt")]
    assert os.path.isfile(stem + ".json") and not os.path.exists(stem + ".ckpt.pt")
    assert rec.settings["cache_bytes_per_image"]["train"] == 64 * 8 * 8 * 2  # C x h x w fp16
    # a finished run is returned as is, not re-run
    again = EVALUATORS.get("linear-seg")().run(config(voc, proto, results, cache_dir))
    assert again.created == rec.created and again.metrics == rec.metrics
    with open(stem + ".json") as f:
        assert json.load(f)["protocol"] == "fast-small"


def test_fast_run_killed_mid_training_resumes_to_the_same_record(voc, cache_dir, tmp_path) -> None:
    proto = scaled_protocol_t(tmp_path / "fast-resume.yaml", "fast", "fast-resume", max_iters=30,
                            optimizer={"type": "AdamW", "lrs": [0.05, 0.2], "weight_decay": 1e-4,
                                       "betas": [0.9, 0.999], "grad_clip": None}, **dict(FAST_SMALL, eval_interval=10,
                                                                                          checkpoint_interval=10))
    ref = EVALUATORS.get("linear-seg")().run(config(voc, proto, str(tmp_path / "a"), cache_dir))
    with pytest.raises(SimulatedKill):
        EVALUATORS.get("linear-seg")().run(config(voc, proto, str(tmp_path / "b"), cache_dir,
                                                  extra={"kill_after_iters": 17}))
    resumed = EVALUATORS.get("linear-seg")().run(config(voc, proto, str(tmp_path / "b"), cache_dir))
    assert resumed.settings["resumed_from_iter"] == 10
    assert resumed.metrics == ref.metrics and resumed.settings["heldout"] == ref.settings["heldout"]
    with open(ref.settings["artifacts"]["curves_csv"]) as fa, open(resumed.settings["artifacts"]["curves_csv"]) as fb:
        assert fa.read() == fb.read()


def test_faithful_recipe_runs_with_mmseg_transforms_and_resumes(voc, cache_dir, tmp_path) -> None:
    proto = scaled_protocol_t(tmp_path / "faithful-small.yaml", "faithful", "faithful-small", train_scale=[2048, 64],
                            crop_size=[56, 56], test_scale=[2048, 64], slide_crop=[56, 56], slide_stride=[37, 37],
                            max_iters=8, batch_size=4, eval_interval=4, checkpoint_interval=3, log_interval=2,
                            schedule={"policy": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 2,
                                      "warmup_ratio": 1e-6})
    ref = EVALUATORS.get("linear-seg")().run(config(voc, proto, str(tmp_path / "a"), cache_dir, limit=8))
    assert ref.settings["mode"] == "faithful" and ref.protocol == "faithful-small" and ref.num_images == 8
    assert ref.settings["token_grid_train"] == [4, 4] and ref.settings["train_images"] == 8
    assert any("limit=8" in n for n in ref.notes) and not any("fast protocol" in n for n in ref.notes)
    with pytest.raises(SimulatedKill):
        EVALUATORS.get("linear-seg")().run(config(voc, proto, str(tmp_path / "b"), cache_dir, limit=8,
                                                  extra={"kill_after_iters": 5}))
    resumed = EVALUATORS.get("linear-seg")().run(config(voc, proto, str(tmp_path / "b"), cache_dir, limit=8))
    assert resumed.settings["resumed_from_iter"] == 3
    assert resumed.metrics == ref.metrics


def test_accumulated_iou_equals_mmseg_iou_metric() -> None:
    """Independent reference: mmseg's IoUMetric on the same predictions (ignore 255, dataset-level areas)."""
    from harness.compat.mmcv_ops import import_mmseg

    import_mmseg()
    from mmseg.evaluation.metrics import IoUMetric

    rng = np.random.default_rng(0)
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": [f"c{i}" for i in range(6)]}
    acc = IoUAccumulator(6)
    for _ in range(4):
        label = torch.from_numpy(rng.integers(0, 6, size=(17, 23)))
        label[torch.from_numpy(rng.random((17, 23)) < 0.1)] = 255
        pred = torch.where(torch.from_numpy(rng.random((17, 23)) < 0.7), label.clamp(max=5),
                           torch.from_numpy(rng.integers(0, 6, size=(17, 23))))
        acc.update(pred, label)
        metric.process({}, [{"pred_sem_seg": {"data": pred[None]}, "gt_sem_seg": {"data": label[None]}}])
    ref = metric.compute_metrics(metric.results)
    ours = acc.compute()
    for k in ("mIoU", "mAcc", "aAcc"):
        assert ours[k] == pytest.approx(ref[k], abs=0.006), k  # mmseg rounds to 2 decimals


def test_clear_errors(voc, cache_dir, tmp_path) -> None:
    ev = EVALUATORS.get("linear-seg")()
    with pytest.raises(ConfigError, match="no entry for dataset 'voc20'"):
        ev.run(RunConfig(task="linear-seg", backbone="test-vit-tiny", method="vanilla", dataset="voc20",
                         data_root=voc, random_init=True, results_dir=str(tmp_path), progress=False))
    with pytest.raises(DataError, match="does not exist"):
        ev.run(config(str(tmp_path / "nowhere"), "fast", str(tmp_path), cache_dir))
    bad = scaled_protocol_t(tmp_path / "bad.yaml", "fast", "bad")
    with open(bad) as f:
        data = yaml.safe_load(f)
    del data["defaults"]["holdout_fraction"]
    with open(bad, "w") as f:
        yaml.safe_dump(data, f)
    with pytest.raises(ConfigError, match=r"bad\.yaml: datasets\.\w+: missing key\(s\) holdout_fraction"):
        ev.run(config(voc, bad, str(tmp_path), cache_dir))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_subprocess_interrupted_mid_run_resumes_to_the_same_record(voc, cache_dir, tmp_path, sig) -> None:
    """A real process stopped by Ctrl-C (checkpoint at the current iteration) or SIGKILL (last periodic one)."""
    proto = scaled_protocol_t(tmp_path / "fast-sub.yaml", "fast", "fast-sub", max_iters=300,
                            optimizer={"type": "AdamW", "lrs": [0.05, 0.2], "weight_decay": 1e-4,
                                       "betas": [0.9, 0.999], "grad_clip": None},
                            **dict(FAST_SMALL, eval_interval=100, checkpoint_interval=20))
    ref = EVALUATORS.get("linear-seg")().run(config(voc, proto, str(tmp_path / "a"), cache_dir))
    results = str(tmp_path / "b")
    code = ("from harness.evaluators.base import RunConfig; from harness.registry import EVALUATORS; "
            f"EVALUATORS.get('linear-seg')().run(RunConfig(task='linear-seg', backbone='test-vit-tiny', "
            f"method='vanilla', dataset='voc21', data_root={voc!r}, protocol={proto!r}, random_init=True, "
            f"results_dir={results!r}, cache_dir={cache_dir!r}, num_workers=0, progress=False))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not glob.glob(os.path.join(results, "**", "*.ckpt.pt"), recursive=True):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode != 0, out[-2000:]
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in out
    resumed = EVALUATORS.get("linear-seg")().run(config(voc, proto, results, cache_dir))
    assert resumed.settings["resumed_from_iter"] and resumed.settings["resumed_from_iter"] > 0
    assert resumed.metrics == ref.metrics and resumed.settings["heldout"] == ref.settings["heldout"]


def test_a_run_shorter_than_its_checkpoint_interval_writes_into_a_fresh_results_folder(voc, cache_dir,
                                                                                         tmp_path) -> None:
    """No checkpoint is ever written, so the record's folder must be made by the first artifact (head.pt)."""
    proto = scaled_protocol_t(tmp_path / "short.yaml", "fast", "fast-short",
                              **dict(FAST_SMALL, max_iters=4, eval_interval=4, checkpoint_interval=100))
    rec = EVALUATORS.get("linear-seg")().run(config(voc, proto, str(tmp_path / "fresh" / "results"), cache_dir,
                                                    limit=6))
    assert os.path.isfile(rec.settings["artifacts"]["head"])


def test_a_version_1_file_keeps_the_pixel_loss_and_a_record_of_its_own(voc, cache_dir, tmp_path) -> None:
    """A fast YAML without ``train_loss`` (as version 1 shipped) trains with the full-resolution loss; its record
    and the version-2 record of the same run live side by side, never mixed, and share the feature cache."""
    v2 = scaled_protocol_t(tmp_path / "f2.yaml", "fast", "fast-ver",
                           **dict(FAST_SMALL, max_iters=4, eval_interval=4, checkpoint_interval=100))
    with open(v2) as f:
        data = yaml.safe_load(f)
    data["version"] = 1
    del data["defaults"]["train_loss"]
    v1 = tmp_path / "f1.yaml"
    v1.write_text(yaml.safe_dump(data))
    results = str(tmp_path / "r")
    r1 = EVALUATORS.get("linear-seg")().run(config(voc, str(v1), results, cache_dir, limit=6))
    r2 = EVALUATORS.get("linear-seg")().run(config(voc, v2, results, cache_dir, limit=6))
    assert (r1.protocol_version, r1.settings["train_loss"]) == (1, "pixel")
    assert (r2.protocol_version, r2.settings["train_loss"]) == (2, "token")
    a1, a2 = r1.settings["artifacts"], r2.settings["artifacts"]
    assert a1["head"] != a2["head"] and a1["train_cache"] == a2["train_cache"]
    assert "train_targets_cache" in a2 and "train_targets_cache" not in a1
    assert any("token grid" in n for n in r2.notes) and not any("token grid" in n for n in r1.notes)
