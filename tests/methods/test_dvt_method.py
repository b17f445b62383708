"""``--method dvt``: DVT's denoiser file (the authors' layout), its forward against a line-by-line
re-derivation of theirs, compositions, and one clear error for every bad file."""
from __future__ import annotations

import json
import math
import os
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

from harness.errors import WeightsError
from harness.methods.dvt import POS_GRID, resample_pos_embed
from harness.models import attach_method, build_dense_model


def authors_state(c: int, grid: int, blocks: int = 1, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A random ``ckpt["denoiser"]`` in the layout of Denoising-ViT @ 82704df (``Denoiser.state_dict()`` with
    ``vit=None``: ``denoiser.<timm Block keys>`` -- ``denoiser.<i>.`` for ``--num_blocks > 1`` -- and
    ``pos_embed`` (1, grid*grid, C)), written out by hand, not through our classes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def block(p: str) -> Dict[str, torch.Tensor]:
        return {f"{p}norm1.weight": 1 + r(c, scale=0.2), f"{p}norm1.bias": r(c),
                f"{p}attn.qkv.weight": r(3 * c, c, scale=c ** -0.5), f"{p}attn.qkv.bias": r(3 * c),
                f"{p}attn.proj.weight": r(c, c, scale=c ** -0.5), f"{p}attn.proj.bias": r(c),
                f"{p}norm2.weight": 1 + r(c, scale=0.2), f"{p}norm2.bias": r(c),
                f"{p}mlp.fc1.weight": r(4 * c, c, scale=c ** -0.5), f"{p}mlp.fc1.bias": r(4 * c),
                f"{p}mlp.fc2.weight": r(c, 4 * c, scale=(4 * c) ** -0.5), f"{p}mlp.fc2.bias": r(c)}

    sd = {"pos_embed": r(1, grid * grid, c, scale=0.5)}
    for i in range(blocks):
        sd.update(block("denoiser." if blocks == 1 else f"denoiser.{i}."))
    return sd


def save_authors_file(path: str, sd: Dict[str, torch.Tensor]) -> str:
    """``main_denoiser.py`` writes {"denoiser": ..., "optimizer": ..., "step": ...}."""
    torch.save({"denoiser": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6}]}, "step": 49999}, path)
    return path


def reference_denoise(feats: torch.Tensor, sd: Dict[str, torch.Tensor], heads: int,
                      prefix: str = "denoiser.") -> torch.Tensor:
    """``Denoiser.forward`` with ``vit=None`` (dvt/models/online_denoiser.py @ 82704df, lines 62-105), written
    out line by line: ``x = x.reshape(b, h*w, c)``; ``x = x + resample_abs_pos_embed(pos_embed, (h, w),
    num_prefix_tokens=0)`` (timm layers/pos_embed.py: bicubic ``F.interpolate`` with antialias on the square
    grid); ``x = Block(x)`` with timm's pre-norm Block ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, LayerNorm
    eps 1e-6, exact GELU, softmax(q k^T / sqrt(d)) attention."""
    b, h, w, c = feats.shape
    x = feats.reshape(b, h * w, c)
    pos = sd["pos_embed"]
    m = math.isqrt(pos.shape[1])
    if (h, w) != (m, m):
        pos = F.interpolate(pos.reshape(1, m, m, c).permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                            antialias=True).permute(0, 2, 3, 1).reshape(1, h * w, c)
    x = x + pos
    y = F.layer_norm(x, (c,), sd[f"{prefix}norm1.weight"], sd[f"{prefix}norm1.bias"], eps=1e-6)
    qkv = y @ sd[f"{prefix}attn.qkv.weight"].t() + sd[f"{prefix}attn.qkv.bias"]
    q, k, v = qkv.reshape(b, h * w, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // heads), dim=-1)
    o = (att @ v).transpose(1, 2).reshape(b, h * w, c)
    x = x + o @ sd[f"{prefix}attn.proj.weight"].t() + sd[f"{prefix}attn.proj.bias"]
    y = F.layer_norm(x, (c,), sd[f"{prefix}norm2.weight"], sd[f"{prefix}norm2.bias"], eps=1e-6)
    y = F.gelu(y @ sd[f"{prefix}mlp.fc1.weight"].t() + sd[f"{prefix}mlp.fc1.bias"])
    x = x + y @ sd[f"{prefix}mlp.fc2.weight"].t() + sd[f"{prefix}mlp.fc2.bias"]
    return x.reshape(b, h, w, c)


@pytest.fixture(scope="module")
def planted():
    return build_dense_model("test-planted-clip", "vanilla", random_init=True)


def _final_normed(model, x: torch.Tensor) -> torch.Tensor:
    t = model.run_blocks(model.start(x), 0, model.vision.num_blocks)
    f = model.vision.final_norm(t.x)
    return f, t.layout


def test_fidelity_planted_clip_before_proj(planted, tmp_path) -> None:
    """CLIP: the denoiser acts on the final-normed patch tokens, then ``proj``; CLS passes through
    (32x32 PE resampled to a 4x6 grid)."""
    sd = authors_state(64, POS_GRID[16])
    path = save_authors_file(str(tmp_path / "vit_base_patch16_clip_384.pth"), sd)
    model = attach_method(planted.backbone, "dvt", method_weights=path)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        got = model.forward_dense(x)
        normed, lay = _final_normed(planted, x)
        patches = normed[:, lay.patches].reshape(2, 4, 6, 64)
        ref = reference_denoise(patches, sd, heads=1) @ planted.backbone.visual.proj
        ref_cls = normed[:, 0] @ planted.backbone.visual.proj
    diff = (got.patch.permute(0, 2, 3, 1) - ref).abs().max().item()
    print(f"dvt fidelity (planted CLIP, 4x6 grid from 32x32 PE): max |diff| = {diff:.2e}")
    assert diff <= 1e-5 * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got.cls, ref_cls, rtol=0, atol=1e-6)
    assert model.method_weights["dvt"] and model.name == "dvt"


def test_fidelity_dinov2_against_timm_features(tmp_path) -> None:
    """timm DINOv2 (width 384, 6 heads, 37x37 PE -> 5x9): input from timm's own ``forward_intermediates(norm=True)``."""
    sd = authors_state(384, POS_GRID[14], seed=1)
    path = save_authors_file(str(tmp_path / "vit_small_patch14_dinov2.lvd142m.pth"), sd)
    model = build_dense_model("dinov2-s14", "dvt", random_init=True, method_weights=path)
    x = torch.randn(2, 3, 70, 126)
    with torch.no_grad():
        got = model.forward_dense(x)
        vit = model.backbone.model
        (patch, prefix), = vit.forward_intermediates(x, indices=[len(vit.blocks) - 1], return_prefix_tokens=True,
                                                     norm=True, intermediates_only=True, output_fmt="NCHW")
        ref = reference_denoise(patch.permute(0, 2, 3, 1), sd, heads=6)
    diff = (got.patch.permute(0, 2, 3, 1) - ref).abs().max().item()
    print(f"dvt fidelity (dinov2-s14, 5x9 grid from 37x37 PE): max |diff| = {diff:.2e}")
    assert diff <= 1e-5 * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got.cls, prefix[:, 0], rtol=1e-5, atol=1e-5)


def test_native_grid_is_not_resampled_and_odd_grids_are() -> None:
    pos = torch.randn(1, 32 * 32, 8)
    assert resample_pos_embed(pos, (32, 32)) is pos
    out = resample_pos_embed(pos, (21, 28))
    ref = F.interpolate(pos.reshape(1, 32, 32, 8).permute(0, 3, 1, 2), size=(21, 28), mode="bicubic", antialias=True)
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1).reshape(1, 21 * 28, 8))


def test_multi_block_file_and_compositions(planted, tmp_path) -> None:
    """``--num_blocks 2`` files load (``denoiser.0.``, ``denoiser.1.``); ``naclip+dvt`` and ``maskclip+dvt``
    apply the denoiser to the cleaned last block's final-normed tokens."""
    sd2 = authors_state(64, POS_GRID[16], blocks=2, seed=3)
    path2 = save_authors_file(str(tmp_path / "two.pth"), sd2)
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        two = attach_method(planted.backbone, "dvt", method_weights=path2).forward_dense(x)
        normed, lay = _final_normed(planted, x)
        p = normed[:, lay.patches].reshape(1, 3, 5, 64)
        no_pos = {**sd2, "pos_embed": torch.zeros(1, 1, 64)}  # the PE is added once, before the first block
        ref = reference_denoise(reference_denoise(p, sd2, 1, "denoiser.0."), no_pos, 1, "denoiser.1.")
        ref = ref @ planted.backbone.visual.proj
    torch.testing.assert_close(two.patch.permute(0, 2, 3, 1), ref, rtol=1e-5, atol=1e-5)

    path = save_authors_file(str(tmp_path / "one.pth"), authors_state(64, POS_GRID[16]))
    for base in ("naclip", "maskclip"):
        comp = attach_method(planted.backbone, f"{base}+dvt", method_weights=path)
        assert comp.name == f"{base}+dvt" and list(comp.method_weights) == ["dvt"]
        with torch.no_grad():
            plain, den = attach_method(planted.backbone, base).forward_dense(x), comp.forward_dense(x)
        assert den.patch.shape == plain.patch.shape and not torch.allclose(den.patch, plain.patch)
        torch.testing.assert_close(den.cls, plain.cls)  # CLS is passed through
    assert attach_method(planted.backbone, "dvt+naclip", method_weights=path).name == "naclip+dvt"


def _bad_files(tmp_path) -> Dict[str, str]:
    ok = str(tmp_path / "ok.pth")
    save_authors_file(ok, authors_state(64, POS_GRID[16]))
    data = open(ok, "rb").read()
    files = {k: tmp_path / f"{k}.pth" for k in ("trunc", "other", "distilled", "width", "square", "pickle", "ours",
                                                "keys")}
    files["json"] = tmp_path / "neurons.json"
    files["trunc"].write_bytes(data[: len(data) // 2])
    files["json"].write_text(json.dumps({"backbone": "test-planted-clip", "neurons": [[1, 2]]}))
    torch.save({"state_dict": {"w": torch.zeros(1)}}, files["other"])
    torch.save({"model": {"model.cls_token": torch.zeros(1, 1, 64)}, "step": 1}, files["distilled"])
    save_authors_file(str(files["width"]), authors_state(768, 37))
    save_authors_file(str(files["square"]), {**authors_state(64, 32), "pos_embed": torch.zeros(1, 32 * 31, 64)})
    torch.save({"denoiser": {"pos_embed": torch.zeros(1, 4, 64)}, "cfg": argparse_like()}, files["pickle"])
    torch.save({"denoiser": authors_state(64, 32), "harness": {"backbone": "clip-b16-openai"}}, files["ours"])
    sd = authors_state(64, 32)
    sd["denoiser.ls1.gamma"] = torch.ones(64)
    save_authors_file(str(files["keys"]), sd)
    return {k: str(v) for k, v in files.items()}


class argparse_like:  # noqa: N801 - a pickled object that is not a tensor (weights_only must refuse it)
    pass


@pytest.mark.parametrize("which,match", [
    ("trunc", "cannot read it as a tensor-only PyTorch checkpoint"),
    ("json", "cannot read it as a tensor-only PyTorch checkpoint"),
    ("pickle", "cannot read it as a tensor-only PyTorch checkpoint"),
    ("other", "no 'denoiser' entry"),
    ("distilled", "load a distilled ViT as backbone weights with --weights"),
    ("width", "width 768, but the final-norm features of backbone 'test-planted-clip' have width 64"),
    ("square", "not a square grid"),
    ("ours", "trained on backbone 'clip-b16-openai', not 'test-planted-clip'"),
    ("keys", "not one timm Block"),
])
def test_bad_files_raise_one_clear_weights_error(planted, tmp_path, which: str, match: str) -> None:
    files = _bad_files(tmp_path)
    with pytest.raises(WeightsError) as e:
        attach_method(planted.backbone, "dvt", method_weights=files[which])
    msg = str(e.value)
    assert match in msg and files[which] in msg and msg.startswith("--method-weights"), msg
    assert "\n" not in msg


def test_weights_are_required(planted, tmp_path) -> None:
    with pytest.raises(WeightsError, match="needs --method-weights: a DVT denoiser checkpoint"):
        attach_method(planted.backbone, "dvt")
    with pytest.raises(WeightsError, match="no such file"):
        attach_method(planted.backbone, "dvt", method_weights=os.path.join(str(tmp_path), "nope.pth"))


@pytest.mark.parametrize("which,match", [
    ("trunc", "cannot read it as a tensor-only PyTorch checkpoint"),
    ("distilled", "load a distilled ViT as backbone weights with --weights"),
    ("width", "width 768"),
])
def test_bad_files_via_the_cli_are_one_line_exit_2(tmp_path, capsys, which: str, match: str) -> None:
    from harness.cli import main
    from harness.synthetic.segmentation import write_synthetic_dataset

    data = write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=1, size=(32, 48))
    path = _bad_files(tmp_path)[which]
    rc = main(["run", "ovss", "--backbone", "test-planted-clip", "--random-init", "--dataset", "voc21", "--data-root",
               data, "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
               "--workers", "0", "--no-progress", "--method", "naclip+dvt", "--method-weights", path])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("harness: error: --method-weights " + path) and match in lines[0], err
