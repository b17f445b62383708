"""torchrun with 2 CPU processes (gloo) gives the same record as a single process."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml

from harness.results.record import load_records

PROTO = {"id": "tiny-dist", "version": 1, "task": "ovss", "description": "t", "source": "tests",
         "defaults": {"mode": "whole", "crop": 64, "stride": 32, "max_long_side": 2048, "resize": 48,
                      "logit_scale": 40, "prob_thd": 0.0, "area_thd": None, "pamr": None, "name_set": "sclip",
                      "templates": "gem_single"},
         "datasets": {"voc20": {}}}


def _run(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_torchrun_two_ranks_equals_single_process(tmp_path):
    from harness.synthetic.segmentation import write_synthetic_dataset

    root = write_synthetic_dataset("voc20", str(tmp_path / "data"), num_images=5, size=(40, 56), seed=2)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(PROTO))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HARNESS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["run", "ovss", "--backbone", "clip-b16-openai", "--method", "clearclip", "--dataset", "voc20",
            "--data-root", root, "--random-init", "--protocol", str(tmp_path / "p.yaml"), "--workers", "0",
            "--no-progress", "--device", "cpu"]
    _run([sys.executable, "-m", "harness.cli", *args, "--results-dir", str(tmp_path / "single")], env)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "harness.cli",
          *args, "--results-dir", str(tmp_path / "dist")], env)
    (single,) = load_records(str(tmp_path / "single"))
    (dist,) = load_records(str(tmp_path / "dist"))
    assert dist.world_size == 2 and single.world_size == 1
    assert dist.num_images == single.num_images == 5
    for k in ("mIoU", "mAcc", "aAcc"):
        assert abs(dist.metrics[k] - single.metrics[k]) < 1e-9
    assert dist.per_class == single.per_class
