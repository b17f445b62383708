"""``harness distill phreg`` on the planted-artifact CLIP (CPU): the student learns the TTA target and loses the
planted artifacts, a killed run resumes to the same file, and the file evaluates through ``harness run``.

Torch runs on one thread here: the tiny models are dominated by per-op overhead, and on a shared 2-core
machine two threads per process are many times slower than one.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from harness.backbones.planted import CLIP_MEAN, CLIP_STD, low_information_images, planted_mask
from harness.cli import build_parser, main
from harness.distill import phreg as distill
from harness.distill.common import SimulatedKill
from harness.models import attach_method, build_dense_model

RES = 96  # training crop: a 6 x 6 grid of the planted model's 16-px patches
#: a tiny OVSS protocol (as tests/evaluators/test_ovss_cleaners.py's)
OVSS_PROTOCOL = {"id": "test-phreg", "version": 1, "task": "ovss", "description": "tiny CPU protocol for tests",
                 "source": "tests", "defaults": {"mode": "slide", "crop": 48, "stride": 32, "max_long_side": 2048,
                                                 "resize": 64, "logit_scale": 40, "prob_thd": 0.0, "area_thd": None,
                                                 "pamr": None, "name_set": "sclip", "templates": "test_one"},
                 "datasets": {"voc21": {"prob_thd": 0.1}}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """8 low-information images of 96 x 112 px as PNG (the planted model's test images, de-normalised)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    x = low_information_images(8, (96, 112), seed=0)
    x = x * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    for i, im in enumerate(x):
        arr = (im.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return str(folder)


def fast_linear_protocol(path: Path, **overrides) -> str:
    """The shipped ``linear-seg/fast`` protocol scaled down to CPU size (as tests/evaluators/helpers.py does)."""
    import yaml

    from harness.protocols import HERE

    with open(os.path.join(HERE, "linear-seg", "fast.yaml")) as f:
        data = yaml.safe_load(f)
    data["id"] = path.stem
    data.pop("default", None)
    data["defaults"].update(overrides)
    path.write_text(yaml.safe_dump(data))
    return str(path)


def args_for(images: str, out: str, *extra: str, backbone: str = "test-planted-clip"):
    return build_parser().parse_args(["distill", "phreg", "--backbone", backbone, "--random-init", "--images", images,
                                      "--out", out, "--resolution", str(RES), "--batch-size", "4", "--device", "cpu",
                                      "--workers", "0", "--no-progress", *extra])


def figures(student_file: str, images: str) -> Dict[str, float]:
    """Cosine gap to the TTA target and outlier shares, on the training images' centre crops at 96 px.

    * ``cos_gap``: 1 - mean cosine between a model's patch features and the teacher's TTA target;
    * ``outliers``: share of patch features with norm > 3x the image's median (the dense output);
    * ``residual_outliers``: the same share in the residual stream entering the last block -- where the planted
      neuron's artifact tokens live; a MaskCLIP-style last block hides them from the norm of the output.
    """
    bb = build_dense_model("test-planted-clip", random_init=True).backbone
    paths = sorted(str(p) for p in Path(images).glob("*.png"))
    x = torch.stack([distill.load_square_crop(p, RES, 0, bb.spec.mean, bb.spec.std) for p in paths])
    teacher, tta = distill.build_teacher(bb, "open_clip")
    untrained, _ = distill.build_student(bb, RES // 16, seed=0)
    models = {"plain": attach_method(bb, "vanilla"), "untrained": untrained,
              "trained": attach_method(bb, "phreg", method_weights=student_file)}
    out: Dict[str, float] = {}
    with torch.no_grad():
        target = distill.teacher_targets(teacher, tta, x, list(range(100, 100 + len(x))))
        for name, m in models.items():
            f = m.forward_dense(x).patch
            out[f"{name}.cos_gap"] = float(distill.distill_loss(target, f)[1])
            n = f.norm(dim=1).flatten(1)
            out[f"{name}.outliers"] = float((n > 3 * n.median(dim=1, keepdim=True).values).float().mean())
            tok = m.forward_tokens(x, [-2])[-2]
            r = tok.x[:, tok.layout.patches].norm(dim=-1)
            out[f"{name}.residual_outliers"] = float((r > 3 * r.median(dim=1, keepdim=True).values).float().mean())
    out["planted_positions"] = float(planted_mask((RES // 16, RES // 16)).float().mean())
    return out


def losses(csv_path: str, name: str = "loss"):
    with open(csv_path) as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["kind"] == "train" and r["name"] == name]


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory) -> str:
    """A short CPU distillation (60 steps, batch 4): the student every evaluation test below reads."""
    out = str(tmp_path_factory.mktemp("distill") / "student.pth")
    assert distill.run(args_for(images, out, "--steps", "60", "--checkpoint-every", "25")) == 0
    return out


# -- the recipe's pieces ------------------------------------------------------------------------------------
def test_schedule_and_step_plan() -> None:
    """distill_main.py: lr0 for the first step, then lr0 * (end/lr0) ** ((e + 1) / epochs) set after each step."""
    lr = [distill.learning_rate(s, 3, 2, 1e-4, 5e-6) for s in range(7)]
    assert lr[0] == 1e-4 and lr[1] == lr[2] == lr[3] == pytest.approx(1e-4 * (0.05 ** 0.5))
    assert lr[4] == lr[6] == pytest.approx(5e-6)
    assert distill.plan_steps(10, 4, None, None) == (200, 2, 100)  # 100 epochs of floor(10 / 4) steps
    assert distill.plan_steps(10, 4, 7, None) == (7, 2, 4)  # --steps wins; the schedule spans ceil(7 / 2) epochs
    assert distill.plan_steps(3, 8, None, 2) == (2, 1, 2)  # fewer images than a batch: one (wrapped) batch
    t = torch.randn(2, 5, 3, 3)
    loss, cos, mse = distill.distill_loss(t, t.clone())
    assert float(cos) == pytest.approx(0.0, abs=1e-6) and float(mse) == 0.0
    loss, cos, mse = distill.distill_loss(t, -t)
    assert float(cos) == pytest.approx(2.0, abs=1e-6)
    assert float(loss) == pytest.approx(2.0 + float((2 * t).pow(2).mean()))


def test_random_square_crop_keeps_the_short_side(images) -> None:
    path = sorted(Path(images).glob("*.png"))[0]
    a = distill.load_square_crop(str(path), 64, 1, CLIP_MEAN, CLIP_STD)
    b = distill.load_square_crop(str(path), 64, 1, CLIP_MEAN, CLIP_STD)
    crops = {distill.load_square_crop(str(path), 64, s, CLIP_MEAN, CLIP_STD).sum().item() for s in range(6)}
    assert a.shape == (3, 64, 64) and torch.equal(a, b) and len(crops) > 1  # seeded, and the seed moves the crop


# -- acceptance ----------------------------------------------------------------------------------------------
def test_short_distillation_learns_the_target_and_writes_its_files(trained, images) -> None:
    loss = losses(trained + ".curves.csv")
    assert len(loss) == 60 and np.mean(loss[-10:]) < 0.6 * np.mean(loss[:5]), loss
    for suffix in (".curves.csv", ".curves.png", ".json"):
        assert os.path.isfile(trained + suffix), suffix
    assert not os.path.exists(trained + ".ckpt.pt")
    with open(trained + ".json") as f:
        summary = json.load(f)
    assert summary["teacher"] == "naclip+tta" and summary["steps"] == 60 and summary["registers"] == 16
    assert {"register_tokens", "positional_embedding", "conv1.weight", "transformer.resblocks.2.attn.in_proj_weight",
            "transformer.resblocks.3.mlp.c_fc.weight"} <= set(summary["unlocked"])
    assert "transformer.resblocks.1.attn.in_proj_weight" not in summary["unlocked"]
    state = torch.load(trained, weights_only=True)
    assert state["vit.positional_embedding"].shape == (1, 1 + 6 * 6, 64) and state["register_tokens"].shape == (16, 64)
    fig = figures(trained, images)
    print("phreg distill, 60 steps:", json.dumps({k: round(v, 4) for k, v in fig.items()}))
    assert fig["trained.cos_gap"] < 0.5 * fig["untrained.cos_gap"]
    assert fig["trained.residual_outliers"] < fig["untrained.residual_outliers"]
    assert fig["trained.outliers"] < fig["plain.outliers"]


@pytest.mark.slow
def test_a_few_hundred_steps_remove_the_planted_artifacts(images, tmp_path) -> None:
    out = str(tmp_path / "student300.pth")
    assert distill.run(args_for(images, out, "--steps", "300", "--checkpoint-every", "100")) == 0
    fig = figures(out, images)
    print("phreg distill, 300 steps:", json.dumps({k: round(v, 4) for k, v in fig.items()}))
    assert fig["trained.cos_gap"] < 0.3 * fig["untrained.cos_gap"]
    assert fig["trained.residual_outliers"] <= 0.5 * fig["untrained.residual_outliers"]
    assert fig["trained.outliers"] < fig["plain.outliers"] and fig["trained.outliers"] <= fig["untrained.outliers"]


def test_killed_run_resumes_to_the_same_student(images, tmp_path) -> None:
    ref = str(tmp_path / "ref.pth")
    assert distill.run(args_for(images, ref, "--steps", "10", "--checkpoint-every", "4")) == 0
    out = str(tmp_path / "killed.pth")
    killed = args_for(images, out, "--steps", "10", "--checkpoint-every", "4")
    killed.kill_after = 7  # DistillLoop's test hook: stop like SIGKILL, the last checkpoint is step 4
    with pytest.raises(SimulatedKill):
        distill.run(killed)
    assert os.path.isfile(out + ".ckpt.pt") and not os.path.exists(out)
    assert distill.run(args_for(images, out, "--steps", "10", "--checkpoint-every", "4")) == 0
    with open(out + ".json") as f:
        assert json.load(f)["resumed_from_step"] == 4
    a, b = torch.load(ref, weights_only=True), torch.load(out, weights_only=True)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(ref + ".curves.csv") == losses(out + ".curves.csv")


def test_the_student_evaluates_through_harness_run_ovss(trained, tmp_path, monkeypatch) -> None:
    import yaml

    from harness.results.record import load_records
    from harness.synthetic.segmentation import write_synthetic_dataset
    from harness.text import templates

    monkeypatch.setitem(templates.TEMPLATE_SETS, "test_one", ["a photo of a {}."])
    proto = tmp_path / "proto.yaml"
    proto.write_text(yaml.safe_dump(OVSS_PROTOCOL))
    root = write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=2, size=(64, 96))
    results = str(tmp_path / "results")
    assert main(["run", "ovss", "--backbone", "test-planted-clip", "--random-init", "--dataset", "voc21",
                 "--data-root", root, "--protocol", str(proto), "--results-dir", results, "--cache-dir",
                 str(tmp_path / "cache"), "--device", "cpu", "--workers", "0", "--no-progress", "--method", "phreg",
                 "--method-weights", trained]) == 0
    (rec,) = load_records(results)
    assert rec.method == "phreg" and rec.method_weights["phreg"] and 0.0 <= rec.metrics["mIoU"] <= 100.0
    assert rec.settings["method_config"]["layout"] == "vit"


def test_the_student_evaluates_through_harness_run_linear_seg(trained, tmp_path) -> None:
    from harness.results.record import load_records
    from harness.synthetic.segmentation import write_demo_voc

    root = str(tmp_path / "voc")
    data_root = write_demo_voc(root, 8, (64, 96), 0, "train")
    write_demo_voc(root, 3, (64, 96), 0, "val")
    proto = fast_linear_protocol(tmp_path / "fast-tiny.yaml", max_iters=6, test_scale=[448, 64], crop_size=[64, 64],
                                 slide_crop=[64, 64], slide_stride=[48, 48], batch_size=4, holdout_fraction=0.25,
                                 eval_interval=6, checkpoint_interval=3, log_interval=2,
                                 optimizer={"type": "AdamW", "lrs": [0.01], "weight_decay": 1e-4,
                                            "betas": [0.9, 0.999], "grad_clip": None},
                                 schedule={"policy": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 0,
                                           "warmup_ratio": 1e-6})
    results = str(tmp_path / "results")
    assert main(["run", "linear-seg", "--backbone", "test-planted-clip", "--random-init", "--dataset", "voc21",
                 "--data-root", data_root, "--protocol", proto, "--results-dir", results, "--cache-dir",
                 str(tmp_path / "cache"), "--device", "cpu", "--workers", "0", "--no-progress", "--method", "phreg",
                 "--method-weights", trained]) == 0
    (rec,) = load_records(results)
    assert rec.task == "linear-seg" and rec.method == "phreg" and rec.method_weights["phreg"]
    assert rec.settings["token_grid_train"] == [4, 4] and "mIoU" in rec.metrics


def test_dinov2_student_distils_and_loads(images, tmp_path) -> None:
    """The DINOv2 path (plain teacher + TTA, registers first, HF layout out) on the tiny timm ViT."""
    out = str(tmp_path / "dino.pth")
    args = args_for(images, out, "--steps", "3", backbone="test-vit-tiny-p16")
    args.resolution = 64
    assert distill.run(args) == 0
    with open(out + ".json") as f:
        summary = json.load(f)
    assert summary["teacher"] == "tta" and summary["lr"] == 1e-4 and "blocks.1.attn.qkv.weight" in summary["unlocked"]
    state = torch.load(out, weights_only=True)
    assert state["registers"].shape == (1, 16, 64) and "model.encoder.layer.1.attention.attention.query.weight" in state
    bb = build_dense_model("test-vit-tiny-p16", random_init=True).backbone
    model = attach_method(bb, "phreg", method_weights=out)
    with torch.no_grad():
        assert model.forward_dense(torch.randn(1, 3, 64, 96)).patch.shape == (1, 64, 4, 6)
    assert model.describe()["config"]["layout"] == "hf-dinov2"


def test_clear_errors(images, tmp_path) -> None:
    from harness.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="multiple of the patch size 16"):
        distill.run(args_for(images, str(tmp_path / "a.pth"), "--steps", "1", "--resolution", "100"))
    with pytest.raises(DataError, match="no image files"):
        distill.run(args_for(str(tmp_path), str(tmp_path / "b.pth"), "--steps", "1"))
    with pytest.raises(ConfigError, match="--stage 1: stages are for"):
        distill.run(args_for(images, str(tmp_path / "d.pth"), "--steps", "1", "--stage", "1"))
    with pytest.raises(ConfigError, match="no registers of its own"):
        distill.run(args_for(images, str(tmp_path / "c.pth"), "--steps", "1", backbone="test-vit-tiny"))
