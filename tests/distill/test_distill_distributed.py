"""``harness distill`` under torchrun: 2 CPU processes (gloo) at the same global batch train what one process
trains, for PH-Reg (crops and teacher view draws seeded by step and global slot) and both DVT stages (stage 1
shares out each batch's images, stage 2 is deterministic given the batch).
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.backbones.planted import CLIP_MEAN, CLIP_STD, low_information_images
from harness.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _images(folder: Path, n: int, size=(96, 112)) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    x = low_information_images(n, size, seed=4)
    x = x * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    for i, im in enumerate(x):
        arr = (im.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return str(folder)


def _torchrun(argv, expect_ok: bool = True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "harness.cli", *argv], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    if expect_ok:
        assert out.returncode == 0, out.stderr[-4000:]
    return out


def _losses(out: str):
    with open(out + ".curves.csv") as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["name"] == "loss"]


def _same_tensors(a: dict, b: dict, atol: float) -> None:
    """Equal up to float rounding, as Adam sees it: an element whose gradient is nearly 0 moves by up to one
    learning rate per step on rounding noise alone, so ``atol`` is a tenth of one step's learning rate."""
    assert set(a) == set(b)
    for k, v in a.items():
        assert torch.allclose(v.float(), b[k].float(), rtol=1e-4, atol=atol), k


@pytest.mark.slow  # one in-process run + 2 torchrun processes, 3 steps on the planted CLIP
def test_phreg_two_ranks_train_the_single_process_student(tmp_path):
    images = _images(tmp_path / "im", 6)

    def argv(out):
        return ["distill", "phreg", "--backbone", "test-planted-clip", "--random-init", "--images", images,
                "--out", out, "--resolution", "96", "--batch-size", "4", "--steps", "3", "--checkpoint-every", "2",
                "--device", "cpu", "--workers", "0", "--no-progress"]

    single, dist = str(tmp_path / "one.pth"), str(tmp_path / "two.pth")
    assert main(argv(single)) == 0
    _torchrun(argv(dist))
    _same_tensors(torch.load(single, weights_only=True), torch.load(dist, weights_only=True), atol=3e-5)  # lr 3e-4
    np.testing.assert_allclose(_losses(dist), _losses(single), rtol=1e-5)
    assert len(_losses(single)) == 3 and not os.path.exists(dist + ".ckpt.pt")
    import json

    with open(dist + ".json") as f:
        summary = json.load(f)
    assert summary["world_size"] == 2 and summary["batch_size"] == 4


@pytest.mark.slow
def test_dvt_both_stages_two_ranks_equal_one_process(tmp_path):
    """Stage 1 shares out each batch's images (2 per batch, 1 per rank), stage 2 each batch's pairs."""
    images = _images(tmp_path / "im", 4, size=(64, 64))

    def argv(out):
        return ["distill", "dvt", "--backbone", "test-planted-clip", "--random-init", "--images", images,
                "--out", out, "--views", "2", "--stage1-steps", "4", "--batch-size", "2", "--steps", "4",
                "--resolution", "64", "--checkpoint-every", "3", "--device", "cpu", "--no-progress"]

    single, dist = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    assert main(argv(single)) == 0
    _torchrun(argv(dist))
    s1 = [torch.load(os.path.join(p + ".stage1", "stage1.pt"), weights_only=True) for p in (single, dist)]
    assert torch.allclose(s1[0]["artifact"], s1[1]["artifact"], rtol=1e-4, atol=1e-6)  # the shared G
    for i in range(4):  # every image's fitted field, written by the rank that fitted it
        a, b = (torch.load(os.path.join(p + ".stage1", "features", f"{i:06d}.pt"), weights_only=True)
                for p in (single, dist))
        assert torch.equal(a["raw"], b["raw"]) or torch.allclose(a["raw"], b["raw"], rtol=1e-5, atol=1e-6)
        assert torch.allclose(a["denoised"], b["denoised"], rtol=1e-4, atol=1e-5), i
    np.testing.assert_allclose(_losses(os.path.join(dist + ".stage1", "stage1.pt")),
                               _losses(os.path.join(single + ".stage1", "stage1.pt")), rtol=1e-4)
    a, b = torch.load(single, weights_only=True), torch.load(dist, weights_only=True)
    _same_tensors(a["denoiser"], b["denoiser"], atol=2e-6)  # stage-2 lr: 2e-4 * sqrt(2 / 256) ~ 1.8e-5
    np.testing.assert_allclose(_losses(dist), _losses(single), rtol=1e-4)
