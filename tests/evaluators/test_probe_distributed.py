"""The linear-seg fast probe under torchrun: 2 CPU processes (gloo) at the same global batch train the same heads.

Each rank takes its half of every global batch; gradients are averaged over the ranks and the head's BatchNorm
uses the statistics of the whole global batch (mmseg's SyncBN), so up to float rounding the run is the
single-process one.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness.errors import ConfigError
from harness.results.record import load_records
from harness.runtime import Dist

from .helpers import scaled_protocol

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(test_scale=[448, 112], crop_size=[112, 112], slide_crop=[112, 112], slide_stride=[75, 75],
             batch_size=4, holdout_fraction=0.25, eval_interval=10, checkpoint_interval=10, log_interval=5,
             max_iters=20, optimizer={"type": "AdamW", "lrs": [0.05, 0.2], "weight_decay": 1e-4,
                                      "betas": [0.9, 0.999], "grad_clip": 1.0},
             schedule={"policy": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 5, "warmup_ratio": 1e-6})


def _run(cmd, env):
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _cache_arrays(path):
    """The raw fields of a finished feature cache (``<field>.bin`` files beside ``meta.json``)."""
    import json

    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    assert meta["complete"] and meta["count"] == 8
    return {k: np.fromfile(os.path.join(path, f"{k}.bin"), dtype=dt) for k, dt in meta["fields"].items()}


@pytest.mark.slow  # two torchrun processes + one single run on tiny data: about 100 s on a loaded 2-core machine
def test_torchrun_two_ranks_train_the_single_process_fast_probe(tmp_path):
    from harness.synthetic.segmentation import write_demo_voc

    root = write_demo_voc(str(tmp_path / "voc"), 8, (64, 80), 0, "train")
    write_demo_voc(str(tmp_path / "voc"), 2, (64, 80), 0, "val")
    proto = scaled_protocol(tmp_path / "p.yaml", "linear-seg", "fast", "fast-ddp", **SMALL)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    args = ["run", "linear-seg", "--backbone", "test-vit-tiny", "--method", "vanilla", "--dataset", "voc21",
            "--data-root", root, "--random-init", "--protocol", proto, "--workers", "0", "--no-progress",
            "--device", "cpu", "--batch-size", "2"]  # 2 images per forward: the ranks take turns, 2 images each
    _run([sys.executable, "-m", "harness.cli", *args, "--results-dir", str(tmp_path / "single"),
          "--cache-dir", str(tmp_path / "cache1")], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "harness.cli",
          *args, "--results-dir", str(tmp_path / "dist"), "--cache-dir", str(tmp_path / "cache2")], env)
    (single,) = load_records(str(tmp_path / "single"))
    (dist,) = load_records(str(tmp_path / "dist"))
    assert dist.world_size == 2 and single.world_size == 1
    assert dist.num_images == single.num_images == 2
    # the sharded extraction wrote the single-process cache: same items, same order (features up to fp16 rounding)
    caches = [_cache_arrays(r.settings["artifacts"]["train_cache"]) for r in (single, dist)]
    assert caches[0]["label"].tobytes() == caches[1]["label"].tobytes()
    np.testing.assert_allclose(caches[1]["patch"].astype(np.float32), caches[0]["patch"].astype(np.float32),
                               rtol=1e-2, atol=1e-3)
    heads = [torch.load(r.settings["artifacts"]["head"], weights_only=True) for r in (single, dist)]
    assert heads[0]["lr"] == heads[1]["lr"]
    for k, v in heads[0]["head"].items():  # BN running statistics (global batch) and the trained weights
        assert torch.allclose(v.float(), heads[1]["head"][k].float(), rtol=1e-4, atol=1e-5), k
    for nm, v in single.settings["heldout"].items():
        assert dist.settings["heldout"][nm] == pytest.approx(v, abs=1e-3)
    for k in ("mIoU", "mAcc", "aAcc"):
        assert dist.metrics[k] == pytest.approx(single.metrics[k], abs=1e-3)
    curves = [np.genfromtxt(r.settings["artifacts"]["curves_csv"], delimiter=",", names=True, dtype=None,
                            encoding="utf-8") for r in (single, dist)]
    assert len(curves[0]) == len(curves[1]) and (curves[0]["kind"] == curves[1]["kind"]).all()
    train = curves[0]["kind"] == "train"  # per-iteration losses (mean over the ranks) and learning rates
    np.testing.assert_allclose(curves[1]["value"][train], curves[0]["value"][train], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(curves[1]["value"][~train], curves[0]["value"][~train], atol=1e-3)  # held-out mIoU


def test_a_global_batch_the_ranks_cannot_split_is_refused():
    assert Dist(rank=1, world_size=4).per_rank(16) == 4
    assert Dist(rank=1, world_size=4).shard_batch(list(range(16))) == [4, 5, 6, 7]
    with pytest.raises(ConfigError, match="batch_size 16 does not split over 3 torchrun processes"):
        Dist(rank=0, world_size=3).per_rank(16)
