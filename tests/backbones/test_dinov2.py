"""DINOv2 / DINOv2-reg through timm: specs, the dense interface against timm's own forward, weights."""
from __future__ import annotations

import os

import pytest
import torch

from harness.backbones.weights import sha256_file
from harness.errors import WeightsError
from harness.methods.base import DenseModel
from harness.models import build_dense_model
from harness.registry import BACKBONE_FAMILIES, BACKBONES, METHODS

DINOV2_IDS = {
    "dinov2-s14": ("vit_small_patch14_dinov2", 0), "dinov2-b14": ("vit_base_patch14_dinov2", 0),
    "dinov2-l14": ("vit_large_patch14_dinov2", 0), "dinov2-reg4-s14": ("vit_small_patch14_reg4_dinov2", 4),
    "dinov2-reg4-b14": ("vit_base_patch14_reg4_dinov2", 4), "dinov2-reg4-l14": ("vit_large_patch14_reg4_dinov2", 4),
}


@pytest.mark.parametrize("bid", sorted(DINOV2_IDS))
def test_dinov2_specs(bid: str) -> None:
    spec = BACKBONES.get(bid)
    arch, regs = DINOV2_IDS[bid]
    assert (spec.family, spec.arch, spec.weights_tag) == ("timm", arch, "lvd142m")
    assert spec.hf_hub == f"timm/{arch}.lvd142m"
    assert spec.patch_size == 14 and spec.num_registers == regs and spec.native_size == 518
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert BACKBONE_FAMILIES.get("timm").registry_name == "timm"


def _timm_reference(model: DenseModel, x: torch.Tensor):
    """timm's own final-norm tokens and its prefix/patch split (forward_intermediates)."""
    vit = model.backbone.model
    feats = vit.forward_features(x)
    inter = vit.forward_intermediates(x, indices=[len(vit.blocks) - 1], return_prefix_tokens=True, norm=True,
                                      intermediates_only=True, output_fmt="NCHW")
    patch, prefix = inter[0]
    return feats, patch, prefix


@pytest.mark.parametrize("bid", ["dinov2-s14", "dinov2-reg4-s14"])
def test_dense_interface_matches_timm(bid: str) -> None:
    """Non-native input size (position embedding interpolated): patch grid, CLS and registers as timm splits them."""
    model = build_dense_model(bid, "vanilla", random_init=True)
    x = torch.randn(2, 3, 70, 126)
    with torch.no_grad():
        f = model.forward_dense(x)
        feats, patch, prefix = _timm_reference(model, x)
    regs = model.spec.num_registers
    assert f.patch.shape == (2, 384, 5, 9) and f.cls.shape == (2, 384) and f.registers.shape == (2, regs, 384)
    torch.testing.assert_close(f.patch, patch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.cls, prefix[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.registers, prefix[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.cls, feats[:, 0], rtol=1e-5, atol=1e-5)


def test_last_block_parts_rebuild_the_last_block() -> None:
    """qkv / out_proj / norms / mlp / layer scales recompose timm's last block exactly (methods rely on it)."""
    model = build_dense_model("test-vit-tiny", "vanilla", random_init=True)
    bb = model.backbone
    with torch.no_grad():
        start = model.run_blocks(model.start(torch.randn(1, 3, 56, 42)), 0, bb.num_blocks - 1)
        tokens, grid = start.x, start.layout.grid
        assert grid == (4, 3) and tokens.shape[1] == 1 + 4 + 12
        p = bb.block(bb.num_blocks - 1)
        q, k, v = p.qkv(p.norm1(tokens))
        a = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v
        out = p.out_proj(a.transpose(1, 2).reshape(1, tokens.shape[1], -1))
        x = tokens + p.ls1(out)
        x = x + p.ls2(p.mlp(p.norm2(x)))
        torch.testing.assert_close(x, p.run(tokens), rtol=1e-5, atol=1e-5)
        assert p.num_heads == 2


def test_every_method_runs_on_a_timm_backbone() -> None:
    """The lead's cleaning methods only use the dense interface, so they must run on DINOv2-shaped models."""
    x = torch.randn(1, 3, 42, 56)
    for name in METHODS.names():
        if METHODS.get(name).WEIGHTS == "required":
            continue  # weighted methods are built with their files in their own tests
        model = build_dense_model("test-vit-tiny", name, random_init=True)
        with torch.no_grad():
            f = model.forward_dense(x)
        assert f.patch.shape[-2:] == (3, 4) and f.registers.shape[1] == 4, name


def test_input_must_be_a_patch_multiple() -> None:
    model = build_dense_model("test-vit-tiny", "vanilla", random_init=True)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model.forward_dense(torch.randn(1, 3, 50, 56))


def test_random_init_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_dense_model("test-vit-tiny", "vanilla", random_init=True)
    after = torch.rand(3)
    b = build_dense_model("test-vit-tiny", "vanilla", random_init=True)
    assert torch.equal(expected, after)
    for (ka, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), ka
    assert a.backbone.weights_id == "random-init"


def test_weights_file_loads_and_is_hashed(tmp_path) -> None:
    src = build_dense_model("test-vit-tiny", "vanilla", random_init=True).backbone.model
    with torch.no_grad():
        for t in src.parameters():
            t.add_(0.5)
    path = str(tmp_path / "tiny.pth")
    torch.save(src.state_dict(), path)
    model = build_dense_model("test-vit-tiny", "vanilla", weights=path)
    assert model.backbone.weights_id == sha256_file(path)
    for k, t in src.state_dict().items():
        assert torch.equal(model.backbone.model.state_dict()[k], t), k


def test_original_dinov2_checkpoint_layout_is_converted(tmp_path) -> None:
    """Meta's reg checkpoints: ``register_tokens``, a ``mask_token`` and a CLS slot in ``pos_embed``; timm's filter
    (``_convert_dinov2``) folds the CLS position into ``cls_token``. The adapter must accept that layout."""
    src = build_dense_model("test-vit-tiny", "vanilla", random_init=True).backbone.model.state_dict()
    state = {("register_tokens" if k == "reg_token" else k): v + 1.0 for k, v in src.items()}
    cls_pos = torch.full((1, 1, 64), 0.25)
    state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    state["cls_token"] = state["cls_token"] - cls_pos
    state["mask_token"] = torch.zeros(1, 64)
    path = str(tmp_path / "dinov2_original_layout.pth")
    torch.save(state, path)
    vit = build_dense_model("test-vit-tiny", "vanilla", weights=path).backbone.model
    torch.testing.assert_close(vit.reg_token, src["reg_token"] + 1.0)
    torch.testing.assert_close(vit.cls_token, src["cls_token"] + 1.0)
    torch.testing.assert_close(vit.pos_embed, src["pos_embed"] + 1.0)


def test_weights_of_another_architecture_are_a_clear_error(tmp_path) -> None:
    other = build_dense_model("test-vit-tiny-p16", "vanilla", random_init=True).backbone.model
    path = str(tmp_path / "p16.pth")
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsError, match=r"p16\.pth.*test-vit-tiny"):
        build_dense_model("test-vit-tiny", "vanilla", weights=path)


def test_missing_weights_say_where_and_how(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError) as e:
        build_dense_model("dinov2-reg4-b14", "vanilla")
    msg = str(e.value)
    assert "huggingface-cli download timm/vit_base_patch14_reg4_dinov2.lvd142m" in msg
    assert "--random-init" in msg and "--weights" in msg
    assert os.path.join(str(tmp_path), "empty-cache") in msg
