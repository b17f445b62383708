"""Every writer creates its folder: each evaluator and each distill command runs into a results/output folder
that does not exist yet, with a protocol (or step count) shorter than its checkpoint interval, so no checkpoint
ever creates the folder first (linear-seg once failed this way: tests/evaluators/test_linear_seg.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness.evaluators.base import RunConfig
from harness.registry import EVALUATORS

from .helpers import ovss_args, records, run_cli, voc, write_protocol

PROTOCOLS = Path(__file__).resolve().parents[2] / "harness" / "protocols"


def _scaled(path: Path, task: str, base: str, **overrides) -> str:
    data = yaml.safe_load((PROTOCOLS / task / f"{base}.yaml").read_text())
    data["id"] = path.stem
    data.pop("default", None)
    data["defaults"].update(overrides)
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def nyu(tmp_path_factory):
    from harness.prepare.nyu import prepare_nyu
    from harness.synthetic.nyu import write_synthetic_nyu

    mat, splits = write_synthetic_nyu(str(tmp_path_factory.mktemp("nyu_raw")), num_train=6, num_test=2, seed=0)
    root = str(tmp_path_factory.mktemp("nyu"))
    prepare_nyu(mat, root, splits)
    return root


SCHEDULE = {"policy": "cosine", "min_lr_ratio": 1e-8, "warmup_iters": 1, "warmup_ratio": 1e-3, "momentum": "onecycle"}


@pytest.mark.parametrize("mode", ["fast", "faithful"])
def test_depth_into_a_fresh_results_folder(nyu, tmp_path, mode) -> None:
    extra = dict(holdout_fraction=0.2) if mode == "fast" else {}
    proto = _scaled(tmp_path / f"depth-{mode}-short.yaml", "depth", mode, crop_size=[112, 140], max_iters=2,
                    batch_size=2, eval_interval=2, checkpoint_interval=100, log_interval=1, sigloss_warmup_iters=1,
                    schedule=SCHEDULE, **extra)
    results = tmp_path / "fresh" / "nested" / "results"
    rec = EVALUATORS.get("depth")().run(RunConfig(
        task="depth", backbone="test-vit-tiny", method="vanilla", dataset="nyu", data_root=nyu, protocol=proto,
        random_init=True, results_dir=str(results), cache_dir=str(tmp_path / "fresh" / "cache"), num_workers=0,
        progress=False, limit=3))
    assert rec.settings["mode"] == mode and records(results)
    for key in ("head", "curves_csv", "curves_png"):
        assert os.path.isfile(rec.settings["artifacts"][key]), key


def test_ovss_into_a_fresh_results_and_cache_folder(capsys, tmp_path) -> None:
    root = voc(tmp_path / "data", n=1)
    results = tmp_path / "fresh" / "a" / "results"
    rc, _, err = run_cli(capsys, ovss_args(root, results, tmp_path / "fresh" / "b" / "cache", write_protocol(tmp_path)))
    assert rc == 0, err
    assert records(results)


def _images(folder: Path, n: int = 2) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("cleaner", ["phreg", "dvt"])
def test_distill_into_a_fresh_output_folder(capsys, tmp_path, cleaner) -> None:
    out = tmp_path / "fresh" / "nested" / f"{cleaner}.pth"
    extra = ["--views", "2", "--stage1-steps", "2"] if cleaner == "dvt" else []
    rc, _, err = run_cli(capsys, ["distill", cleaner, "--backbone", "test-planted-clip", "--random-init", "--images",
                                  str(_images(tmp_path / "im")), "--out", str(out), "--resolution", "32",
                                  "--batch-size", "2", "--steps", "2", "--checkpoint-every", "100", "--device", "cpu",
                                  "--workers", "0", "--no-progress", *extra])
    assert rc == 0, err
    assert out.is_file() and Path(str(out) + ".curves.csv").is_file() and Path(str(out) + ".curves.png").is_file()
    assert not Path(str(out) + ".ckpt.pt").exists()
