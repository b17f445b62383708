"""``harness distill dvt`` on the planted-artifact backbone: stage 1 finds the planted position-fixed artifact,
stage 2 removes the outliers on held-out images, ``naclip+dvt`` runs in ``harness run ovss``, and a run killed
in either stage resumes to the uninterrupted result.

What "the planted artifact" is here (the stage-1 acceptance figure): ``D(p)`` = the mean, over the training
images and all their stage-1 views, of (plain features - features with the planted register neuron zeroed)
at view position ``p`` (final-normed, before ``proj``: where DVT works). Its strength per position is
``A(p) = <D(p), e>`` with ``e`` the direction the neuron writes (its ``c_proj`` column) as the final
LayerNorm's scale maps it, normalised. The learned shared term ``G`` is compared the same way,
``<G(p), e>``, by Pearson correlation over the patch grid; also against ``planted_mask``. Why project: ``G``
also holds the positional embedding's own imprint on the features (the planted model's positional ``gate``
pattern, itself position-dependent -- an "artifact" in DVT's sense too), which is not the planted neuron's doing.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.backbones.planted import (
    CLIP_MEAN,
    CLIP_STD,
    PLANTED_LAYER,
    PLANTED_UNIT,
    low_information_images,
    planted_mask,
)
from harness.cli import build_parser, main
from harness.distill import dvt
from harness.distill.common import SimulatedKill
from harness.models import attach_method, build_dense_model

RES = 224  # the planted model's native grid (14 x 14), where its gate pattern is exact
S1 = dvt.Stage1Settings(resolution=RES, views=32, steps=120, batch=8, samples=256, levels=4, features=4)
S2 = dvt.Stage2Settings(steps=120, batch=4, lr=1e-3)  # recipe lr 2e-4*sqrt(4/256) is too slow for 120 steps


def write_images(folder: Path, n: int, seed: int, size: int = RES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    x = low_information_images(n, size=(size, size), seed=seed)
    x = x * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    for i, im in enumerate(x):
        arr = (im.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:02d}.png")
    return folder


def outlier_share(patch: torch.Tensor) -> float:
    """Share of patch tokens whose norm exceeds 3x their image's median patch norm (dense output, after proj)."""
    n = patch.norm(dim=1).flatten(1)
    return float((n > 3 * n.median(dim=1, keepdim=True).values).float().mean())


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvt")
    paths = sorted(glob.glob(str(write_images(root / "images", 8, seed=1) / "*.png")))
    model = build_dense_model("test-planted-clip", "vanilla", random_init=True)
    out = str(root / "dvt.pt")
    folder = dvt.stage1_dir(out)
    dvt.stage1(model, paths, folder, S1, torch.device("cpu"), show_progress=False)
    dvt.stage2(folder, out, S2, torch.device("cpu"), "test-planted-clip", show_progress=False)
    return {"root": root, "paths": paths, "model": model, "out": out, "folder": folder}


def _zero_neuron(module, inputs, out):
    out = out.clone()
    out[..., PLANTED_UNIT] = 0
    return out


def test_stage1_shared_term_recovers_the_planted_artifact(trained) -> None:
    model, grid = trained["model"], RES // 16
    stage1 = torch.load(os.path.join(trained["folder"], dvt.STAGE1_FILE), weights_only=True)
    g = stage1["artifact"]  # (C, h, w)
    assert g.shape == (64, grid, grid) and stage1["harness"]["images"] == trained["paths"]
    d, count = torch.zeros_like(g), 0
    for i, path in enumerate(trained["paths"]):  # the views stage 1 saw (seeded per image)
        img = dvt.load_square(path, RES, model.spec)
        views, _ = dvt.make_views(img, S1.views, (grid, grid), (S1.seed, 0, i))
        plain = dvt.view_features(model, img, views, 64, torch.device("cpu"))
        hook = model.backbone.block(PLANTED_LAYER).mlp_act.register_forward_hook(_zero_neuron)
        try:
            zeroed = dvt.view_features(model, img, views, 64, torch.device("cpu"))
        finally:
            hook.remove()
        d += (plain - zeroed).sum(0).t().reshape_as(g)
        count += plain.shape[0]
    d /= count
    visual = model.backbone.visual
    e = visual.ln_post.weight.detach() * visual.transformer.resblocks[PLANTED_LAYER].mlp.c_proj.weight[:, PLANTED_UNIT]
    e = e.detach() / e.norm()
    strength, learned = torch.einsum("chw,c->hw", d, e), torch.einsum("chw,c->hw", g, e)
    mask = planted_mask((grid, grid)).float()
    r_art, r_mask = corr(learned, strength), corr(learned, mask)
    print(f"\nstage 1: corr(<G,e>, <D,e>) = {r_art:.4f}; corr(<G,e>, planted_mask) = {r_mask:.4f}; "
          f"corr(<D,e>, planted_mask) = {corr(strength, mask):.4f}")
    assert r_art >= 0.9 and r_mask >= 0.9


def test_stage2_lowers_the_outlier_share_on_held_out_images(trained) -> None:
    model = trained["model"]
    ckpt = torch.load(trained["out"], weights_only=True)
    assert set(ckpt["denoiser"]) >= {"pos_embed", "denoiser.norm1.weight", "denoiser.attn.qkv.weight"}
    assert ckpt["denoiser"]["pos_embed"].shape == (1, 14 * 14, 64)
    assert ckpt["harness"]["backbone"] == "test-planted-clip"
    den = attach_method(model.backbone, "dvt", method_weights=trained["out"])
    lines = []
    for size in (RES, 448):  # native grid, and 28 x 28 (positional embedding resampled)
        x = low_information_images(6, size=(size, size), seed=7)  # not among the training images (seed 1)
        with torch.no_grad():
            plain, clean = model.forward_dense(x).patch, den.forward_dense(x).patch
            normed = dvt.final_normed_patches(model, x)  # where DVT acts (before proj)
            kept = torch.nn.functional.cosine_similarity(normed, den.parts[0].net(normed), dim=-1)
        before, after = outlier_share(plain), outlier_share(clean)
        # not by collapsing the features: on the tokens that were no outliers the denoiser keeps the content
        n = plain.norm(dim=1)
        kept = float(kept[n <= 3 * n.flatten(1).median(dim=1).values.view(-1, 1, 1)].mean())
        lines.append(f"{size}px: {before:.3f} -> {after:.3f} (non-outliers: cos to plain {kept:.3f} before proj)")
        assert before >= 0.05 and after <= 0.25 * before and kept >= 0.8, lines
    print("\nstage 2 outlier share (norm > 3x median), held-out images: " + "; ".join(lines))


#: a tiny OVSS protocol (as tests/evaluators/test_ovss_cleaners.py's): 48-px windows of 64-px images
OVSS_PROTOCOL = {
    "id": "test-dvt", "version": 1, "task": "ovss", "description": "tiny CPU protocol for tests", "source": "tests",
    "defaults": {"mode": "slide", "crop": 48, "stride": 32, "max_long_side": 2048, "resize": 64, "logit_scale": 40,
                 "prob_thd": 0.0, "area_thd": None, "pamr": None, "name_set": "sclip", "templates": "test_one"},
    "datasets": {"voc21": {"prob_thd": 0.1}},
}


def test_naclip_dvt_runs_in_ovss(trained, monkeypatch) -> None:
    import yaml

    from harness.results.record import load_records
    from harness.synthetic.segmentation import write_synthetic_dataset
    from harness.text import templates

    monkeypatch.setitem(templates.TEMPLATE_SETS, "test_one", ["a photo of a {}."])
    root = trained["root"]
    proto = root / "proto.yaml"
    proto.write_text(yaml.safe_dump(OVSS_PROTOCOL))
    data = write_synthetic_dataset("voc21", str(root / "data"), num_images=2, size=(64, 96))
    rc = main(["run", "ovss", "--backbone", "test-planted-clip", "--random-init", "--dataset", "voc21",
               "--data-root", data, "--protocol", str(proto), "--results-dir", str(root / "results"),
               "--cache-dir", str(root / "cache"), "--device", "cpu", "--workers", "0", "--no-progress",
               "--method", "naclip,naclip+dvt", "--method-weights", trained["out"]])
    assert rc == 0
    recs = {r.method: r for r in load_records(str(root / "results"))}
    assert set(recs) == {"naclip", "naclip+dvt"}
    assert list(recs["naclip+dvt"].method_weights) == ["dvt"] and not recs["naclip"].method_weights
    assert "mIoU" in recs["naclip+dvt"].metrics


def _cli(images: Path, out: Path, *extra: str) -> list:
    return ["distill", "dvt", "--backbone", "test-planted-clip", "--random-init", "--images", str(images),
            "--out", str(out), "--views", "4", "--stage1-steps", "12", "--batch-size", "2", "--steps", "8",
            "--resolution", "64", "--checkpoint-every", "5", "--device", "cpu", "--no-progress", *extra]


def _killed(argv: list, after: int) -> None:
    args = build_parser().parse_args(argv)
    args.kill_after = after
    with pytest.raises(SimulatedKill):
        dvt.run(args)


def test_resume_after_a_kill_in_either_stage_equals_an_uninterrupted_run(trained, capsys) -> None:
    root = trained["root"]
    small = root / "small"
    small.mkdir()
    for p in trained["paths"][:3]:
        os.link(p, small / os.path.basename(p))
    ref, res = root / "ref.pt", root / "resumed.pt"
    assert main(_cli(small, ref)) == 0  # --stage all, uninterrupted: 2 batches x 12 steps, then 8 steps
    assert "--method dvt --method-weights" in capsys.readouterr().out
    _killed(_cli(small, res, "--stage", "1"), after=17)  # mid second batch; last checkpoint at step 15
    s1 = str(res) + ".stage1/stage1.pt"
    assert os.path.isfile(s1 + ".ckpt.pt") and not os.path.isfile(s1)
    assert main(_cli(small, res, "--stage", "1")) == 0
    _killed(_cli(small, res, "--stage", "2"), after=6)  # checkpoint at step 5
    assert main(_cli(small, res, "--stage", "2")) == 0
    a, b = (torch.load(f"{p}.stage1/stage1.pt", weights_only=True) for p in (ref, res))
    assert torch.equal(a["artifact"], b["artifact"])
    for f in sorted(os.listdir(f"{ref}.stage1/features")):
        fa, fb = (torch.load(f"{p}.stage1/features/{f}", weights_only=True) for p in (ref, res))
        assert torch.equal(fa["denoised"], fb["denoised"]) and torch.equal(fa["raw"], fb["raw"])
    da, db = (torch.load(p, weights_only=True)["denoiser"] for p in (ref, res))
    assert set(da) == set(db) and all(torch.equal(da[k], db[k]) for k in da)
    assert os.path.isfile(str(res) + ".curves.csv") and not os.path.isfile(str(res) + ".ckpt.pt")
    # a finished run is not redone
    mtime = os.path.getmtime(res)
    assert main(_cli(small, res)) == 0 and os.path.getmtime(res) == mtime


@pytest.mark.parametrize("extra,match", [
    (["--stage", "3"], "--stage 3: dvt has stages 1"),
    (["--stage", "2"], "no finished DVT stage-1 output"),
    (["--views", "0"], "needs --views, --stage1-steps and --batch-size >= 1"),
    (["--resolution", "70"], "--resolution 70: not a multiple of the patch size 16"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, match) -> None:
    images = write_images(tmp_path / "im", 1, seed=3, size=32)
    rc = main(_cli(images, tmp_path / "o.pt", *extra))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and match in lines[0], err
