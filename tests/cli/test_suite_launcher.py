"""`harness suite --launcher local|slurm`: one submitit job per cell, gathered by `harness report`."""
from __future__ import annotations

import csv
import os

import pytest
import yaml

from harness.cli import main
from harness.results.record import load_records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO = {"id": "tiny-launch", "version": 1, "task": "ovss", "description": "t", "source": "tests",
         "defaults": {"mode": "whole", "crop": 64, "stride": 32, "max_long_side": 2048, "resize": 48,
                      "logit_scale": 40, "prob_thd": 0.0, "area_thd": None, "pamr": None, "name_set": "sclip",
                      "templates": "gem_single"},
         "datasets": {"voc21": {}, "voc20": {}}}


@pytest.fixture
def job_env(tmp_path, monkeypatch):
    """The jobs are new processes: they must import this checkout and share the test's caches."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(PROTO))
    return tmp_path


def _suite(tmp_path, datasets):
    suite = {"task": "ovss", "protocol": str(tmp_path / "p.yaml"), "backbones": ["test-planted-clip"],
             "methods": ["maskclip", "naclip"], "datasets": datasets}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    return str(tmp_path / "s.yaml")


@pytest.mark.slow  # two fresh processes each import torch/open_clip: 85-180 s on a loaded 2-core machine
def test_local_launcher_runs_every_cell_and_report_shows_them(job_env, capsys):
    from harness.synthetic.segmentation import write_synthetic_dataset

    tmp_path = job_env
    data = tmp_path / "data"
    root = write_synthetic_dataset("voc21", str(data / "voc"), num_images=2, size=(40, 56))
    rel = root[len(str(data)) + 1:]  # voc20 reads the same VOC2012 root
    res = tmp_path / "res"
    rc = main(["suite", _suite(tmp_path, {"voc21": rel}), "--data-dir", str(data), "--random-init",
               "--workers", "0", "--device", "cpu", "--results-dir", str(res), "--no-progress",
               "--launcher", "local", "--time", "10", "--cpus", "1"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    assert out.out.count("submitted ") == 2 and "2 of 2 cells finished" in out.out
    cells = {("maskclip", "voc21"), ("naclip", "voc21")}
    assert {(r.method, r.dataset) for r in load_records(str(res))} == cells
    assert len([d for d in os.listdir(res / "jobs") if d != "%j"]) == 2  # one submitit folder per job
    assert main(["report", "--results-dir", str(res)]) == 0
    with open(res / "leaderboard.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "ours" and r["metric"] == "mIoU"]
    assert {(r["method"], r["dataset"]) for r in rows} == cells
    assert {r["backbone"] for r in rows} == {"test-planted-clip"}
    md = (res / "LEADERBOARD.md").read_text()
    assert "maskclip" in md.lower() and "naclip" in md.lower()


def test_local_launcher_names_the_failed_cell(job_env, capsys):
    """A cell whose run fails (here: its dataset root is missing) fails its job; the suite says which, exits 1."""
    tmp_path = job_env
    (tmp_path / "data").mkdir()
    suite = {"task": "ovss", "protocol": str(tmp_path / "p.yaml"), "backbones": ["test-planted-clip"],
             "methods": ["maskclip"], "datasets": {"voc21": "missing"}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    rc = main(["suite", str(tmp_path / "s.yaml"), "--data-dir", str(tmp_path / "data"), "--random-init",
               "--workers", "0", "--device", "cpu", "--results-dir", str(tmp_path / "res"), "--no-progress",
               "--launcher", "local", "--time", "10", "--cpus", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "failed: test-planted-clip/maskclip/voc21" in err and "exited with 2" in err
    assert "harness: error: voc21 at" in err and "does not exist" in err  # the cell's own message, from its log


def test_slurm_launcher_needs_a_partition(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"task": "ovss", "backbones": ["b"], "methods": ["m"],
                                                      "datasets": {"voc21": "x"}}))
    assert main(["suite", str(tmp_path / "s.yaml"), "--data-dir", str(tmp_path), "--launcher", "slurm"]) == 2
    assert "--launcher slurm needs --partition" in capsys.readouterr().err


def test_slurm_job_settings_follow_the_flags(tmp_path, monkeypatch):
    """Partition, GPUs (one task each), time, CPUs and memory reach the sbatch parameters (nothing is submitted)."""
    from submitit.slurm.slurm import SlurmExecutor

    from harness.launcher import JobSettings, make_executor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as if srun were on PATH
    ex = make_executor("slurm", JobSettings(folder=str(tmp_path), partition="gpu", gpus=4, time_min=90, cpus=32,
                                            mem_gb=200, max_parallel=3))
    p = ex._executor.parameters
    assert (p["partition"], p["gpus_per_node"], p["ntasks_per_node"], p["time"], p["cpus_per_task"], p["mem"],
            p["nodes"]) == ("gpu", 4, 4, 90, 8, "200GB", 1)
    assert p["array_parallelism"] == 3
