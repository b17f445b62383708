"""``--method phreg``: the authors' student files in every layout, token layouts, and fidelity to their forwards.

The fidelity tests re-derive PH-Reg's own student forwards from their code (github.com/0raiser0/PH-Reg), written
here from the state dict alone with torch primitives (no harness adapter code), and compare the dense features
of ``--method phreg`` with them at a non-square input that is not the training size.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

from harness.backbones.base import PATCHES
from harness.cli import main
from harness.errors import ConfigError, WeightsError
from harness.methods.phreg import LAYOUT_HF, LAYOUT_ORIGINAL, LAYOUT_VIT, TOKEN_KIND, CLIPStudent, timm_to_hf
from harness.models import attach_method, build_dense_model

ROOT = Path(__file__).resolve().parents[2]


# -- helpers: random students in the authors' layouts ---------------------------------------------------
def clip_student_state(backbone, layout: str, grid: int = 28, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A random CLIP student: the backbone's visual tensors perturbed, a ``grid``² positional embedding and 16
    registers, under the authors' key names (``original_image_encoder.*`` or ``vit.*`` + ``register_tokens``)."""
    g = torch.Generator().manual_seed(seed)
    vis = {k: v.detach().clone() for k, v in backbone.visual.state_dict().items()}
    width = vis["class_embedding"].shape[-1]
    for k, v in vis.items():
        vis[k] = v + 0.02 * torch.randn(v.shape, generator=g)
    vis["positional_embedding"] = 0.05 * torch.randn(1 + grid * grid, width, generator=g)
    if layout == LAYOUT_VIT:  # StudentCLIP stores (1, 1 + M², D)
        vis["positional_embedding"] = vis["positional_embedding"].unsqueeze(0)
    prefix = {LAYOUT_VIT: "vit.", LAYOUT_ORIGINAL: "original_image_encoder."}[layout]
    out = {prefix + k: v for k, v in vis.items()}
    out["register_tokens"] = torch.randn(16, width, generator=g) / math.sqrt(width)
    return out


def dinov2_student_state(backbone, seed: int = 0, duplicates: bool = True) -> Dict[str, torch.Tensor]:
    """A random DINOv2 student in ``RegDINOv2Base.state_dict()``'s layout (HF names under ``model.``, the same
    tensors under ``embed.``/``encoder.``/``layernorm.``, ``registers`` (1, 16, D))."""
    g = torch.Generator().manual_seed(seed)
    own = {k: v.detach().clone() + 0.02 * torch.randn(v.shape, generator=g)
           for k, v in backbone.model.state_dict().items()}
    hf = timm_to_hf(own, len(backbone.model.blocks))
    width = own["cls_token"].shape[-1]
    hf["embeddings.mask_token"] = torch.zeros(1, width)
    out = {f"model.{k}": v for k, v in hf.items()}
    if duplicates:
        for alias, pre in (("embed.", "embeddings."), ("encoder.", "encoder."), ("layernorm.", "layernorm.")):
            out.update({alias + k[len(pre):]: v for k, v in hf.items() if k.startswith(pre)})
    out["registers"] = torch.randn(1, 16, width, generator=g) / math.sqrt(width)
    return out


def save(state, path: Path) -> str:
    torch.save(state, path)
    return str(path)


# -- reference forwards, line by line from the authors' code --------------------------------------------
def _layer_norm(x, sd, key, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps)


def _attention(x, w_in, b_in, w_out, b_out, heads):
    """nn.MultiheadAttention(x, x, x) without mask (what OpenAI's ResidualAttentionBlock.attention calls)."""
    b, n, d = x.shape
    q, k, v = F.linear(x, w_in, b_in).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1)
    return F.linear((a @ v).transpose(1, 2).reshape(b, n, d), w_out, b_out)


def authors_clip_student(sd: Dict[str, torch.Tensor], images: torch.Tensor, layout: str, patch: int = 16,
                         heads: int = 0, quick_gelu: bool = True) -> torch.Tensor:
    """Dense features (B, C, h, w) of PH-Reg's CLIP student, re-derived from

    * ``ModifiedImageEncoder.forward`` / ``upsampling_pos_embedding`` (models/OpenaiMaskCLIP/clip_reg.py @ 1a6f9b8,
      the demo's loader) for ``original_image_encoder.*``;
    * ``StudentCLIP.forward`` / ``interpolate_pos_encoding`` (CLIP/zero_shot/models/student_CLIP.py @ e13242e)
      for ``vit.*``;

    both with ``ModifiedResBlock`` / ``ModifiedLastLayer`` as the last block and OpenAI CLIP's
    ``ResidualAttentionBlock`` (QuickGELU) before it; the slice ``[:, 1:-16]`` and the row-major reshape of
    ``DistilledMaskCLIP.forward_feature`` (CLIP/zero_shot/segmentor.py @ e13242e). ``heads=0``: OpenAI's rule;
    ``quick_gelu=False`` swaps OpenAI's QuickGELU for GELU (the planted test tower uses GELU).
    """
    pre = "vit." if layout == LAYOUT_VIT else "original_image_encoder."
    s = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    width = s["class_embedding"].shape[0]
    heads = heads or width // 64  # OpenAI clip/model.py build_model: vision_heads = vision_width // 64
    depth = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("transformer.resblocks."))
    img_h, img_w = images.shape[-2], images.shape[-1]
    x = F.conv2d(images, s["conv1.weight"], stride=patch)  # self.original_image_encoder.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, N_patches, C]
    cls_token = s["class_embedding"] + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls_token, x], dim=1)
    pos = s["positional_embedding"]
    if layout == LAYOUT_ORIGINAL:
        # (img_h, img_w) != self.input_resolutions -> upsampling_pos_embedding(image_shape=(img_h, img_w))
        n_patches, hidden = pos[1:].shape
        m = int(math.sqrt(n_patches))
        p2d = pos[1:].reshape(-1, m, m, hidden).permute(0, 3, 1, 2)
        p2d = F.interpolate(p2d, size=(img_h // patch, img_w // patch), mode="bicubic", align_corners=False,
                            recompute_scale_factor=False)
        pos_embed = torch.cat([pos[:1], p2d.permute(0, 2, 3, 1).reshape(-1, hidden)], dim=0)
    else:
        # StudentCLIP: img_w, img_h = x.shape[-2], x.shape[-1] (sic: w is the height) -> interpolate_pos_encoding
        pos = pos.squeeze(0)
        n = pos.shape[0] - 1
        w0, h0 = img_h // patch + 0.1, img_w // patch + 0.1
        p2d = F.interpolate(pos[1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), width).permute(0, 3, 1, 2),
                            mode="bicubic", scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), align_corners=False,
                            recompute_scale_factor=False)
        assert int(w0) == p2d.shape[-2] and int(h0) == p2d.shape[-1]
        pos_embed = torch.cat([pos[:1], p2d.permute(0, 2, 3, 1).reshape(-1, width)], dim=0)
    x = x + pos_embed
    registers = sd["register_tokens"].unsqueeze(0).expand(x.shape[0], -1, -1)
    x = torch.cat([x, registers], dim=1)  # [B, 1 + N_patches + 16, C]
    x = _layer_norm(x, s, "ln_pre", 1e-5)
    for i in range(depth):
        b = f"transformer.resblocks.{i}"
        if i < depth - 1:  # ResidualAttentionBlock: x + attn(ln_1(x)); x + mlp(ln_2(x)) with QuickGELU
            x = x + _attention(_layer_norm(x, s, f"{b}.ln_1", 1e-5), s[f"{b}.attn.in_proj_weight"],
                               s[f"{b}.attn.in_proj_bias"], s[f"{b}.attn.out_proj.weight"],
                               s[f"{b}.attn.out_proj.bias"], heads)
            h = F.linear(_layer_norm(x, s, f"{b}.ln_2", 1e-5), s[f"{b}.mlp.c_fc.weight"], s[f"{b}.mlp.c_fc.bias"])
            h = h * torch.sigmoid(1.702 * h) if quick_gelu else F.gelu(h)  # QuickGELU (OpenAI clip/model.py)
            x = x + F.linear(h, s[f"{b}.mlp.c_proj.weight"], s[f"{b}.mlp.c_proj.bias"])
        else:  # ModifiedResBlock.forward: v_out = out_proj(v_in_proj(ln_1(x))), no residual, no MLP
            v_w, v_b = s[f"{b}.attn.in_proj_weight"][-width:], s[f"{b}.attn.in_proj_bias"][-width:]
            v_in = F.linear(_layer_norm(x, s, f"{b}.ln_1", 1e-5), v_w, v_b)
            x = F.linear(v_in, s[f"{b}.attn.out_proj.weight"], s[f"{b}.attn.out_proj.bias"])
    x = _layer_norm(x, s, "ln_post", 1e-5) @ s["proj"]
    feats = x[:, 1:-16, :]  # DistilledMaskCLIP.forward_feature
    return feats.permute(0, 2, 1).reshape(x.shape[0], -1, img_h // patch, img_w // patch)


def authors_dinov2_student(sd: Dict[str, torch.Tensor], images: torch.Tensor, patch: int, heads: int,
                           eps: float = 1e-6) -> torch.Tensor:
    """Dense features (B, C, h, w) of ``RegDINOv2Base.forward`` (DINOv2_full/models/studentDINOv2.py @ 5910d50)
    over Hugging Face transformers 4.37.2 ``Dinov2Model`` modules: ``Dinov2Embeddings`` (conv patches, CLS,
    ``interpolate_pos_encoding`` with the +0.1 scale factor), registers concatenated *before* the embeddings'
    output, each ``Dinov2Layer`` (norm1 -> self-attention -> layer_scale1 -> residual; norm2 -> MLP (GELU) ->
    layer_scale2 -> residual), ``layernorm``, and ``last_hidden_state[:, 17:]`` (distill_main.py)."""
    s = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    depth = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("encoder.layer."))
    b, _, height, width = images.shape
    x = F.conv2d(images, s["embeddings.patch_embeddings.projection.weight"],
                 s["embeddings.patch_embeddings.projection.bias"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([s["embeddings.cls_token"].expand(b, -1, -1), x], dim=1)
    pos = s["embeddings.position_embeddings"]
    num_positions = pos.shape[1] - 1
    h0, w0 = height // patch + 0.1, width // patch + 0.1
    m = int(math.sqrt(num_positions))
    p2d = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    p2d = F.interpolate(p2d.float(), scale_factor=(float(h0 / math.sqrt(num_positions)),
                                                   float(w0 / math.sqrt(num_positions))),
                        mode="bicubic", align_corners=False)
    x = x + torch.cat([pos[:, :1], p2d.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)
    x = torch.cat([sd["registers"].expand(b, -1, -1), x], dim=1)  # registers first, no positional embedding
    d = x.shape[-1]
    for i in range(depth):
        L = f"encoder.layer.{i}"
        y = _layer_norm(x, s, f"{L}.norm1", eps)
        q, k, v = (F.linear(y, s[f"{L}.attention.attention.{n}.weight"], s[f"{L}.attention.attention.{n}.bias"])
                   .view(b, -1, heads, d // heads).transpose(1, 2) for n in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        y = F.linear((a @ v).transpose(1, 2).reshape(b, -1, d), s[f"{L}.attention.output.dense.weight"],
                     s[f"{L}.attention.output.dense.bias"])
        x = x + y * s[f"{L}.layer_scale1.lambda1"]
        y = F.linear(_layer_norm(x, s, f"{L}.norm2", eps), s[f"{L}.mlp.fc1.weight"], s[f"{L}.mlp.fc1.bias"])
        y = F.linear(F.gelu(y), s[f"{L}.mlp.fc2.weight"], s[f"{L}.mlp.fc2.bias"])
        x = x + y * s[f"{L}.layer_scale2.lambda1"]
    x = _layer_norm(x, s, "layernorm", eps)[:, 17:]
    return x.transpose(1, 2).reshape(b, d, height // patch, width // patch)


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted():
    return build_dense_model("test-planted-clip", random_init=True).backbone


@pytest.fixture(scope="module")
def tiny_dino():
    return build_dense_model("test-vit-tiny-p16", random_init=True).backbone


# -- fidelity -----------------------------------------------------------------------------------------------
def test_clip_student_equals_the_authors_forward(tmp_path) -> None:
    """Random ViT-B/16 + a random student in the released layout (28 x 28 positional embedding), at 224 x 320
    (not 448, not square): ``--method phreg`` equals ``ModifiedImageEncoder``'s forward within 1e-4."""
    clip_b16 = build_dense_model("clip-b16-openai", random_init=True).backbone
    sd = clip_student_state(clip_b16, LAYOUT_ORIGINAL)
    model = attach_method(clip_b16, "phreg", method_weights=save(sd, tmp_path / "student.pth"))
    x = torch.randn(1, 3, 224, 320, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.forward_dense(x).patch
        ref = authors_clip_student(sd, x, LAYOUT_ORIGINAL)
    assert ours.shape == ref.shape == (1, 512, 14, 20)
    diff = float((ours - ref).abs().max())
    print(f"phreg CLIP fidelity (ViT-B/16, released layout, 224x320): max |diff| = {diff:.2e}")
    assert diff < 1e-4
    cfg = model.describe()["config"]
    assert cfg["layout"] == LAYOUT_ORIGINAL and cfg["stored_grid"] == 28 and cfg["pos_interpolation"] == "size"


def test_clip_student_vit_layout_equals_student_clip_forward(planted, tmp_path) -> None:
    """``vit.*`` (StudentCLIP, +0.1 rule) on the small planted tower (2 heads, GELU), 96 x 160 from a 7 x 7 grid."""
    sd = clip_student_state(planted, LAYOUT_VIT, grid=7, seed=5)
    model = attach_method(planted, "phreg", method_weights=save(sd, tmp_path / "student.pth"))
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.forward_dense(x).patch
        ref = authors_clip_student(sd, x, LAYOUT_VIT, heads=2, quick_gelu=False)
    assert ours.shape == ref.shape == (2, 32, 6, 10)
    assert float((ours - ref).abs().max()) < 1e-4
    assert model.describe()["config"]["pos_interpolation"] == "offset"


def test_dinov2_student_equals_the_authors_forward(tiny_dino, tmp_path) -> None:
    sd = dinov2_student_state(tiny_dino)
    path = save(sd, tmp_path / "student.pth")
    model = attach_method(tiny_dino, "phreg", method_weights=path)
    x = torch.randn(2, 3, 160, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.forward_dense(x).patch
        ref = authors_dinov2_student(sd, x, patch=16, heads=tiny_dino.model.blocks[0].attn.num_heads)
    assert ours.shape == ref.shape == (2, 64, 10, 14)
    assert float((ours - ref).abs().max()) < 1e-4
    assert model.describe()["config"]["layout"] == LAYOUT_HF


# -- token layouts and composition ----------------------------------------------------------------------------
def test_token_layouts_and_dense_output(planted, tiny_dino, tmp_path) -> None:
    clip = attach_method(planted, "phreg", method_weights=save(clip_student_state(planted, LAYOUT_VIT, grid=7),
                                                                tmp_path / "c.pth"))
    dino = attach_method(tiny_dino, "phreg", method_weights=save(dinov2_student_state(tiny_dino), tmp_path / "d.pth"))
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        tc = clip.forward_tokens(x, [-1])[-1]
        td = dino.forward_tokens(x, [-1])[-1]
        fc, fd = clip.forward_dense(x), dino.forward_dense(x)
    assert [k for k, _ in tc.layout.segments] == ["cls", PATCHES, TOKEN_KIND]
    assert tc.layout.span(TOKEN_KIND) == slice(1 + 48, 1 + 48 + 16)
    assert [k for k, _ in td.layout.segments] == [TOKEN_KIND, "cls", PATCHES]
    assert td.layout.span(TOKEN_KIND) == slice(0, 16)
    assert fc.patch.shape == (1, 32, 6, 8) and fc.registers.shape[1] == 0  # added tokens are not dense output
    assert fd.patch.shape == (1, 64, 6, 8) and fd.cls is not None
    # the student's text tower is the backbone's; the backbone itself is untouched
    assert clip.vision is not planted and clip.backbone is planted and isinstance(clip.vision, CLIPStudent)
    assert not hasattr(clip.vision.base.model, "transformer")


def test_dinov2_last_block_is_the_plain_block_and_clip_last_block_is_maskclip(planted, tiny_dino, tmp_path) -> None:
    """DINOv2: blocks run unchanged (= the timm block); CLIP: the value path (= --method maskclip's rule)."""
    dino = attach_method(tiny_dino, "phreg", method_weights=save(dinov2_student_state(tiny_dino), tmp_path / "d.pth"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tokens = dino.run_blocks(dino.start(x), 0, dino.vision.num_blocks - 1)
        last = dino.vision.block(dino.vision.num_blocks - 1)
        assert torch.equal(dino.parts[0].last_block(dino.vision, last, tokens), last.run(tokens.x))
    clip = attach_method(planted, "phreg", method_weights=save(clip_student_state(planted, LAYOUT_VIT, 6),
                                                                tmp_path / "c.pth"))
    maskclip = attach_method(planted, "maskclip")
    with torch.no_grad():
        tokens = clip.run_blocks(clip.start(x), 0, 3)
        last = clip.vision.block(3)
        torch.testing.assert_close(clip.parts[0].last_block(clip.vision, last, tokens),
                                   maskclip.parts[0].last_block(clip.vision, last, tokens))
    with pytest.raises(ConfigError, match="both replace"):
        attach_method(planted, "phreg+naclip", method_weights={"phreg": str(tmp_path / "c.pth")})
    wrapped = attach_method(planted, "phreg+tta", method_weights=str(tmp_path / "c.pth"), params={"views": 2})
    with torch.no_grad():
        assert wrapped.forward_dense(x).patch.shape == (1, 32, 4, 4)


# -- loaders ------------------------------------------------------------------------------------------------
def test_both_clip_layouts_load_the_same_student(planted, tmp_path) -> None:
    """The two CLIP layouts hold the same tensors; with the same interpolation rule they give the same features."""
    vit = clip_student_state(planted, LAYOUT_VIT, grid=7, seed=3)
    orig = {("original_image_encoder." + k[4:] if k.startswith("vit.") else k): v for k, v in vit.items()}
    orig["original_image_encoder.positional_embedding"] = orig["original_image_encoder.positional_embedding"][0]
    a = attach_method(planted, "phreg", method_weights=save(vit, tmp_path / "vit.pth"))
    b = attach_method(planted, "phreg", method_weights=save(orig, tmp_path / "orig.pth"),
                      params={"pos_interpolation": "offset"})
    c = attach_method(planted, "phreg", method_weights=str(tmp_path / "orig.pth"))
    x = torch.randn(1, 3, 112, 112)  # the stored 7 x 7 grid: no interpolation, all three agree
    y = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        assert torch.equal(a.forward_dense(x).patch, c.forward_dense(x).patch)
        assert torch.equal(a.forward_dense(y).patch, b.forward_dense(y).patch)
        assert not torch.allclose(a.forward_dense(y).patch, c.forward_dense(y).patch)  # size vs +0.1 rule
    # what distillation writes reads back to the same student
    again = attach_method(planted, "phreg", method_weights=save(a.parts[0].student.authors_state_dict(),
                                                                 tmp_path / "again.pth"))
    with torch.no_grad():
        assert torch.equal(again.forward_dense(y).patch, a.forward_dense(y).patch)


def test_dinov2_layout_with_and_without_duplicates(tiny_dino, tmp_path) -> None:
    full = dinov2_student_state(tiny_dino, seed=4)
    bare = dinov2_student_state(tiny_dino, seed=4, duplicates=False)
    a = attach_method(tiny_dino, "phreg", method_weights=save(full, tmp_path / "full.pth"))
    b = attach_method(tiny_dino, "phreg", method_weights=save(bare, tmp_path / "bare.pth"))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(a.forward_dense(x).patch, b.forward_dense(x).patch)
    written = a.parts[0].student.authors_state_dict()
    assert set(written) == set(full)
    for k, v in full.items():
        torch.testing.assert_close(written[k], v, rtol=0, atol=0, msg=k)
    edited = dict(full)
    edited["embed.cls_token"] = edited["embed.cls_token"] + 1
    with pytest.raises(WeightsError, match="duplicate differ"):
        attach_method(tiny_dino, "phreg", method_weights=save(edited, tmp_path / "edited.pth"))


def test_bad_files_give_one_clear_error(planted, tiny_dino, tmp_path) -> None:
    good = save(clip_student_state(planted, LAYOUT_ORIGINAL, grid=6), tmp_path / "good.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(Path(good).read_bytes()[:2000])
    with pytest.raises(WeightsError, match=r"truncated\.pth: not a readable PyTorch checkpoint") as e:
        attach_method(planted, "phreg", method_weights=str(truncated))
    assert "\n" not in str(e.value)
    # a foreign checkpoint: the backbone's own open_clip weights
    foreign = save(dict(planted.model.state_dict()), tmp_path / "foreign.pth")
    with pytest.raises(WeightsError, match=r"foreign\.pth: not a PH-Reg student .*missing keys: \d+ .*"
                                           r"unexpected keys: \d+ ") as e:
        attach_method(planted, "phreg", method_weights=foreign)
    assert "register_tokens" in str(e.value)
    one_off = clip_student_state(planted, LAYOUT_VIT, grid=6)
    del one_off["vit.ln_post.bias"]
    one_off["vit.extra"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"missing keys: 1 vit\.ln_post\.bias; unexpected keys: 1 vit\.extra"):
        attach_method(planted, "phreg", method_weights=save(one_off, tmp_path / "one_off.pth"))
    with pytest.raises(WeightsError, match="not a state dict of tensors"):
        attach_method(planted, "phreg", method_weights=save({"step": 3}, tmp_path / "meta.pth"))
    # a student of the other family, and of another architecture of the same family
    with pytest.raises(WeightsError, match="DINOv2 student, Hugging Face"):
        attach_method(tiny_dino, "phreg", method_weights=good)
    wide = clip_student_state(planted, LAYOUT_VIT, grid=6)
    wide["vit.proj"] = torch.zeros(64, 48)
    with pytest.raises(WeightsError, match=r"vit\.proj has shape \(64, 48\).*\(64, 32\)"):
        attach_method(planted, "phreg", method_weights=save(wide, tmp_path / "wide.pth"))
    with pytest.raises(WeightsError, match="needs --method-weights"):
        attach_method(planted, "phreg")
    with pytest.raises(ConfigError, match="pos_interpolation"):
        attach_method(planted, "phreg", method_weights=good, params={"pos_interpolation": "nearest"})
    reg4 = build_dense_model("test-vit-tiny", random_init=True).backbone
    with pytest.raises(ConfigError, match="no registers of its own"):
        attach_method(reg4, "phreg", method_weights=good)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "foreign"])
def test_cli_bad_method_weights_is_one_line_and_exit_2(planted, tmp_path, capsys, kind) -> None:
    from harness.synthetic.segmentation import write_synthetic_dataset

    root = write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=1, size=(32, 32))
    bad = tmp_path / "bad.pth"
    if kind == "garbage":
        bad.write_bytes(b"not a checkpoint at all")
    elif kind == "truncated":
        save(clip_student_state(planted, LAYOUT_VIT, grid=6), bad)
        bad.write_bytes(bad.read_bytes()[:3000])
    else:
        save({"features.0.weight": torch.zeros(8, 3, 3, 3), "classifier.bias": torch.zeros(10)}, bad)
    rc = main(["run", "ovss", "--backbone", "test-planted-clip", "--random-init", "--dataset", "voc21",
               "--data-root", root, "--method", "phreg", "--method-weights", str(bad),
               "--results-dir", str(tmp_path / "r"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("harness: error: --method-weights") and "bad.pth" in err
    assert ("missing keys" in err) if kind == "foreign" else ("not a readable PyTorch checkpoint" in err)


@pytest.mark.slow
def test_cli_subprocess_exit_code(tmp_path) -> None:
    from harness.synthetic.segmentation import write_synthetic_dataset

    root = write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=1, size=(32, 32))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 10)
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "ovss", "--backbone", "test-planted-clip",
                           "--random-init", "--dataset", "voc21", "--data-root", root, "--method", "phreg",
                           "--method-weights", str(bad), "--results-dir", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
