"""torchrun with 2 CPU processes (gloo) gives the single-process record for the depth probe (fast, faithful), the
linear-seg faithful probe and ``harness run artifacts``.

The probes split the protocol's global batch over the ranks (each rank its consecutive slice, augmentations
seeded by the global slot), average the gradients, take BatchNorm statistics and the depth loss over the global
batch, and shard their tests; artifacts shards its images and reduces the sums. So up to float rounding the
2-rank run is the 1-process run: same head weights, same training curves, same metrics.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from harness.cli import main
from harness.results.record import load_records

from .helpers import scaled_protocol

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--random-init", "--workers", "0", "--no-progress", "--device", "cpu"]


def _env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO,
            "HARNESS_CACHE": str(tmp_path / "hcache")}


def _single_and_torchrun(tmp_path, args, monkeypatch):
    """The record of one in-process run and of a 2-rank torchrun run of the same command."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "hcache"))
    assert main([*args, "--results-dir", str(tmp_path / "single"), "--cache-dir", str(tmp_path / "c1")]) == 0
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "harness.cli", *args, "--results-dir", str(tmp_path / "dist"), "--cache-dir",
                          str(tmp_path / "c2")], env=_env(tmp_path), cwd=REPO, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    (single,) = load_records(str(tmp_path / "single"))
    (dist,) = load_records(str(tmp_path / "dist"))
    assert single.world_size == 1 and dist.world_size == 2 and dist.num_images == single.num_images
    return single, dist


def _same_training(single, dist, lr: float) -> None:
    """Head weights (and BN running statistics) and the per-iteration training curve of the two runs agree.

    Up to float rounding as Adam sees it: an element whose gradient is nearly 0 moves by up to one learning
    rate per step on rounding noise alone, so elements may differ by a tenth of ``lr``; the tensors as a whole
    agree to 1e-4 relative."""
    heads = [torch.load(r.settings["artifacts"]["head"], weights_only=True) for r in (single, dist)]
    for k, v in heads[0]["head"].items():
        w = heads[1]["head"][k].float()
        assert torch.allclose(v.float(), w, rtol=1e-4, atol=0.1 * lr), k
        assert float((v.float() - w).norm()) <= 1e-4 * float(v.float().norm()) + 1e-7, k
    curves = [np.genfromtxt(r.settings["artifacts"]["curves_csv"], delimiter=",", names=True, dtype=None,
                            encoding="utf-8") for r in (single, dist)]
    assert len(curves[0]) == len(curves[1]) and (curves[0]["kind"] == curves[1]["kind"]).all()
    train = curves[0]["kind"] == "train"
    np.testing.assert_allclose(curves[1]["value"][train], curves[0]["value"][train], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(curves[1]["value"][~train], curves[0]["value"][~train], rtol=1e-4, atol=1e-4)


# -- depth ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nyu(tmp_path_factory):
    from harness.prepare.nyu import prepare_nyu
    from harness.synthetic.nyu import write_synthetic_nyu

    mat, splits = write_synthetic_nyu(str(tmp_path_factory.mktemp("nyu_raw")), num_train=8, num_test=2, seed=0)
    root = str(tmp_path_factory.mktemp("nyu"))
    prepare_nyu(mat, root, splits)
    return root


DEPTH_SMALL = dict(crop_size=[112, 140], batch_size=4, max_iters=6, eval_interval=3, checkpoint_interval=3,
                   log_interval=1, sigloss_warmup_iters=2,
                   schedule={"policy": "cosine", "min_lr_ratio": 1e-8, "warmup_iters": 2, "warmup_ratio": 1e-3,
                             "momentum": "onecycle"})


def _depth_args(root, proto):
    return ["run", "depth", "--backbone", "test-vit-tiny", "--method", "vanilla", "--dataset", "nyu",
            "--data-root", root, "--protocol", proto, "--batch-size", "2", *COMMON]


@pytest.mark.slow  # one in-process run + 2 torchrun processes on 8 + 2 generated frames
def test_depth_fast_two_ranks_equal_one_process(nyu, tmp_path, monkeypatch):
    proto = scaled_protocol(tmp_path / "p.yaml", "depth", "fast", "fast-ddp", holdout_fraction=0.25,
                            optimizer={"type": "AdamW", "lrs": [1e-2, 3e-2], "weight_decay": 0.01,
                                       "betas": [0.9, 0.999], "grad_clip": 35}, **DEPTH_SMALL)
    single, dist = _single_and_torchrun(tmp_path, _depth_args(nyu, proto), monkeypatch)
    _same_training(single, dist, single.settings["selected_lr"])
    assert dist.settings["selected_lr"] == single.settings["selected_lr"]
    for nm, v in single.settings["heldout"].items():  # lr 0.03 amplifies rounding most: ~3e-4 relative
        assert dist.settings["heldout"][nm] == pytest.approx(v, rel=1e-3)
    for k, v in single.metrics.items():
        assert dist.metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


@pytest.mark.slow
def test_depth_faithful_two_ranks_equal_one_process(nyu, tmp_path, monkeypatch):
    proto = scaled_protocol(tmp_path / "p.yaml", "depth", "faithful", "faithful-ddp", **DEPTH_SMALL)
    single, dist = _single_and_torchrun(tmp_path, [*_depth_args(nyu, proto), "--limit", "4"], monkeypatch)
    _same_training(single, dist, single.settings["optimizer"]["lr"])
    assert dist.num_images == 2
    for k, v in single.metrics.items():
        assert dist.metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert any("split over 2 torchrun processes" in n for n in dist.notes)


# -- linear-seg faithful ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_linear_seg_faithful_two_ranks_equal_one_process(tmp_path, monkeypatch):
    from harness.synthetic.segmentation import write_demo_voc

    root = write_demo_voc(str(tmp_path / "voc"), 8, (64, 80), 0, "train")
    write_demo_voc(str(tmp_path / "voc"), 3, (64, 80), 0, "val")
    proto = scaled_protocol(tmp_path / "p.yaml", "linear-seg", "faithful", "faithful-ddp", train_scale=[2048, 64],
                            crop_size=[56, 56], test_scale=[2048, 64], slide_crop=[56, 56], slide_stride=[37, 37],
                            max_iters=4, batch_size=4, eval_interval=2, checkpoint_interval=2, log_interval=1,
                            schedule={"policy": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 2,
                                      "warmup_ratio": 1e-6})
    args = ["run", "linear-seg", "--backbone", "test-vit-tiny", "--method", "vanilla", "--dataset", "voc21",
            "--data-root", root, "--protocol", proto, *COMMON]
    single, dist = _single_and_torchrun(tmp_path, args, monkeypatch)
    _same_training(single, dist, single.settings["optimizer"]["lr"])
    assert dist.num_images == 3
    for k in ("mIoU", "mAcc", "aAcc"):
        assert dist.metrics[k] == pytest.approx(single.metrics[k], abs=1e-3)


# -- artifacts -------------------------------------------------------------------------------------------
OVSS_WHOLE = {"id": "test-whole", "version": 1, "task": "ovss", "description": "tiny", "source": "tests",
              "defaults": {"mode": "whole", "crop": 64, "stride": 32, "max_long_side": 2048, "resize": 64,
                           "logit_scale": 40, "prob_thd": 0.0, "area_thd": None, "pamr": None, "name_set": "sclip",
                           "templates": "gem_single"},
              "datasets": {"voc21": {}}}


@pytest.mark.slow
def test_artifacts_two_ranks_equal_one_process(tmp_path, monkeypatch):
    from harness.synthetic.segmentation import write_synthetic_dataset

    root = write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=5, size=(60, 80), seed=2)
    (tmp_path / "ovss.yaml").write_text(yaml.safe_dump(OVSS_WHOLE))
    with open(os.path.join(REPO, "harness", "protocols", "artifacts", "phreg.yaml")) as f:
        data = yaml.safe_load(f)
    data["id"] = "test-ddp"
    data.pop("default", None)
    data["defaults"].update({"size_for_patch": {16: 64}, "views": 4, "ovss_protocol": str(tmp_path / "ovss.yaml")})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    args = ["run", "artifacts", "--backbone", "test-planted-clip", "--method", "vanilla", "--dataset", "voc21",
            "--data-root", root, "--protocol", str(tmp_path / "p.yaml"), *COMMON]
    single, dist = _single_and_torchrun(tmp_path, args, monkeypatch)
    assert dist.num_images == 5 and "pearson" in single.metrics
    assert set(dist.metrics) == set(single.metrics)
    for k, v in single.metrics.items():
        assert dist.metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    for k in ("pearson_images", "pearson_unscored_images"):
        assert dist.settings[k] == single.settings[k]
    left = [f for _, _, files in os.walk(tmp_path / "dist") for f in files if ".partial" in f]
    assert not left  # every rank dropped its partial state once the record was written
