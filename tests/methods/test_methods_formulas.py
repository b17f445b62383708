"""Each method's dense logits vs an independent re-implementation from the formulas (harness/methods/last_block.py).

The reference below touches only open_clip's raw parameters (conv1, embeddings, in_proj_weight, ...)
and writes every step of the last block by hand, per head, with explicit loops over heads; it shares
no code with harness/methods or harness/backbones. Input is non-square and not 224 (320 x 208).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.models import attach_method, build_dense_model

H, W = 208, 320  # 13 x 20 patches


def ref_tokens_before_last(visual, x):
    b = x.shape[0]
    feat = F.conv2d(x, visual.conv1.weight, stride=16)  # (B, D, 13, 20)
    gh, gw = feat.shape[-2:]
    tok = feat.reshape(b, feat.shape[1], -1).permute(0, 2, 1)
    pos = visual.positional_embedding
    m = int(math.sqrt(pos.shape[0] - 1))
    grid = pos[1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic", align_corners=False)
    pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
    tok = torch.cat([visual.class_embedding.expand(b, 1, -1), tok], 1) + pos
    tok = visual.ln_pre(tok)
    for blk in visual.transformer.resblocks[:-1]:
        tok = blk(tok)
    return tok, (gh, gw)


def ref_last_block(blk, x, kernel, residual, ffn, grid, sigma=5.0):
    heads = blk.attn.num_heads
    d = x.shape[-1]
    hd = d // heads
    y = F.layer_norm(x, (d,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
    wq, wk, wv = blk.attn.in_proj_weight.split(d)
    bq, bk, bv = blk.attn.in_proj_bias.split(d)
    q, k, v = y @ wq.T + bq, y @ wk.T + bk, y @ wv.T + bv
    gh, gw = grid
    coords = torch.tensor([(i, j) for i in range(gh) for j in range(gw)], dtype=torch.float64)
    omega = torch.zeros(1 + gh * gw, 1 + gh * gw, dtype=torch.float64)
    for a in range(gh * gw):  # NACLIP's Gaussian, written out pair by pair
        dist2 = ((coords - coords[a]) ** 2).sum(1)
        omega[1 + a, 1:] = torch.exp(-dist2 / (2 * sigma ** 2))
    outs = []
    s = hd ** -0.5
    for h in range(heads):
        qh, kh, vh = (t[..., h * hd:(h + 1) * hd] for t in (q, k, v))
        if kernel == "identity":
            outs.append(vh)
            continue
        if kernel == "qk":
            a = torch.softmax(qh @ kh.transpose(1, 2) * s, -1)
        elif kernel == "qq":
            a = torch.softmax(qh @ qh.transpose(1, 2) * s, -1)
        elif kernel == "qq+kk":
            a = torch.softmax(qh @ qh.transpose(1, 2) * s, -1) + torch.softmax(kh @ kh.transpose(1, 2) * s, -1)
        elif kernel == "kk+gauss":
            a = torch.softmax(kh @ kh.transpose(1, 2) * s + omega.float(), -1)
        outs.append(a @ vh)
    o = torch.cat(outs, -1) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    x = x + o if residual else o
    if ffn:
        z = F.layer_norm(x, (d,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
        z = blk.mlp.c_fc(z)
        z = z * torch.sigmoid(1.702 * z)  # QuickGELU (OpenAI CLIP)
        x = x + blk.mlp.c_proj(z)
    return x


def ref_dense_logits(visual, x, text, kernel, residual, ffn):
    tok, grid = ref_tokens_before_last(visual, x)
    tok = ref_last_block(visual.transformer.resblocks[-1], tok, kernel, residual, ffn, grid)
    tok = F.layer_norm(tok, (tok.shape[-1],), visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps)
    tok = tok @ visual.proj
    patches = tok[:, 1:]
    patches = patches / patches.norm(dim=-1, keepdim=True)
    logits = patches @ text.T  # (B, N, Q)
    return logits.permute(0, 2, 1).reshape(x.shape[0], -1, *grid)


CASES = {
    "clip": ("qk", True, True),
    "maskclip": ("identity", False, False),
    "maskclip-official": ("identity", True, True),
    "sclip": ("qq+kk", True, True),
    "clearclip": ("qq", False, False),
    "naclip": ("kk+gauss", False, False),
}


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    model = build_dense_model("clip-b16-openai", "clip", random_init=True)
    x = torch.randn(2, 3, H, W)
    text = F.normalize(torch.randn(7, 512), dim=-1)
    return model.backbone, x, text


@pytest.mark.parametrize("method", list(CASES))
def test_dense_logits_match_formula(method, model_and_input):

    backbone, x, text = model_and_input
    model = attach_method(backbone, method)
    with torch.no_grad():
        feats = model.forward_dense(x).patch
        ours = torch.einsum("bchw,qc->bqhw", F.normalize(feats, dim=1), text)
        ref = ref_dense_logits(backbone.visual, x, text, *CASES[method])
    assert ours.shape == (2, 7, H // 16, W // 16)
    assert (ours - ref).abs().max().item() < 1e-4


def test_methods_really_differ(model_and_input):
    """Guard against a reference that accidentally matches everything."""
    backbone, x, _ = model_and_input
    with torch.no_grad():
        outs = {m: attach_method(backbone, m).forward_dense(x).patch for m in CASES}
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


def test_quickgelu_is_bound_to_openai_id():
    """OpenAI ids must build QuickGELU towers (open_clip issue #771)."""
    from harness.models import get_backbone_spec

    assert get_backbone_spec("clip-b16-openai").arch.endswith("quickgelu")
    assert get_backbone_spec("clip-l14-openai").arch.endswith("quickgelu")
    assert get_backbone_spec("clip-b16-dfn2b").arch.endswith("quickgelu")
    assert not get_backbone_spec("clip-b16-laion2b").arch.endswith("quickgelu")


def test_unknown_method_parameter_is_an_error():
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="valid: sigma"):
        build_dense_model("clip-b16-openai", "naclip", params={"sgima": 3}, random_init=True)
