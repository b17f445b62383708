"""LaSt pooling (arXiv:2602.22394; LAST-ViT @ cdeb884a cls_pretrain/conf.py) against the formula re-computed in
numpy, a hand-computed case, and its place in the readout (after the final norm, before CLIP's ``proj``)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from harness.backbones.pooling import channel_gaussian, last_pool
from harness.models import build_dense_model


def np_last_pool(x: np.ndarray, k: int) -> np.ndarray:
    """The formula, written independently: Gaussian over the shifted spectrum at offsets -(C-1)//2 .. C//2
    (the authors' ``arange(-C // 2 + 1, C // 2 + 1)``), sigma = sqrt(C), max 1; D = X / |X~ - X|; per channel
    the mean of X over the k largest D."""
    x = np.asarray(x, dtype=np.float64)
    c = x.shape[-1]
    t = np.arange(c) - (c - 1) // 2
    g = np.exp(-0.5 * (t / math.sqrt(c)) ** 2)
    g = g / g.max()
    smooth = np.fft.ifft(np.fft.ifftshift(np.fft.fftshift(np.fft.fft(x, axis=-1), axes=-1) * g, axes=-1),
                         axis=-1).real
    d = x / np.abs(smooth - x)
    top = np.argsort(-d, axis=1, kind="stable")[:, :k]  # (B, k, C)
    return np.take_along_axis(x, top, axis=1).mean(axis=1)


@pytest.mark.parametrize("c", [768, 64, 7])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_last_pool_matches_the_formula_in_numpy(c: int, k: int) -> None:
    x = torch.randn(2, 196, c, generator=torch.Generator().manual_seed(c + k))
    got = last_pool(x, k)
    assert got.shape == (2, c) and got.dtype == x.dtype
    np.testing.assert_allclose(got.numpy(), np_last_pool(x.numpy(), k), rtol=0, atol=1e-6)


def test_hand_computed_two_channel_case() -> None:
    """C = 2: the shifted spectrum is [a-b, a+b] and the kernel [1, g] with g = exp(-1/4) (sigma = sqrt 2, offsets
    0, 1: the authors' peak sits one bin off DC). Then X~ - X = -(1-g)(a+b)/2 in both channels, so
    D = X / ((1-g)|a+b|/2): patch (1, 1) -> (1, 1)/(1-g); (2, -1) -> (4, -2)/(1-g); (0.5, 3) -> (2/7, 12/7)/(1-g).
    Channel 0 ranks patches 1, 0, 2; channel 1 ranks 2, 0, 1."""
    g = math.exp(-0.25)
    assert torch.allclose(channel_gaussian(2), torch.tensor([1.0, g], dtype=torch.float64))
    x = torch.tensor([[[1.0, 1.0], [2.0, -1.0], [0.5, 3.0]]])
    assert last_pool(x, 1).tolist() == [[2.0, 3.0]]
    assert last_pool(x, 2).tolist() == [[1.5, 2.0]]
    assert torch.allclose(last_pool(x, 3), torch.tensor([[3.5 / 3, 1.0]]))
    np.testing.assert_allclose(np_last_pool(x.numpy(), 2), [[1.5, 2.0]])


def test_kernel_of_the_released_width() -> None:
    """C = 768 (ViT-B): sigma = sqrt(768); the maximum 1 at offset 0, i.e. position 383 of the shifted spectrum."""
    g = channel_gaussian(768)
    assert g.shape == (768,) and int(g.argmax()) == 383 and float(g.max()) == 1.0
    assert math.isclose(float(g[383 + 100]), math.exp(-0.5 * 100 ** 2 / 768), rel_tol=1e-12)


@pytest.mark.parametrize("k", [0, 5])
def test_k_outside_the_patch_count_is_refused(k: int) -> None:
    with pytest.raises(ValueError, match=f"k={k}"):
        last_pool(torch.randn(1, 4, 8), k)


def _with_last_k(model, k: int):
    model.backbone.spec = dataclasses.replace(model.backbone.spec, last_k=k)
    return model


def test_timm_backbone_global_token_is_the_pooled_final_norm_patches() -> None:
    """With ``last_k`` the CLS of the dense output is LaSt over the final-normed patches; patches are unchanged."""
    model = build_dense_model("test-vit-tiny-p16", "vanilla", random_init=True)
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model.forward_dense(x)
        pooled = _with_last_k(model, 2).forward_dense(x)
    assert torch.equal(plain.patch, pooled.patch)
    patches = pooled.patch.flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(pooled.cls.numpy(), np_last_pool(patches, 2), rtol=0, atol=1e-6)
    assert not torch.allclose(plain.cls, pooled.cls)


def test_clip_global_token_is_pooled_before_the_projection() -> None:
    """open_clip order: ``ln_post``, pool, ``proj`` (VisionTransformer.forward). The planted test CLIP stands in
    for ViT-B/16: same adapter, tiny width."""
    model = _with_last_k(build_dense_model("test-planted-clip", "vanilla", random_init=True), 1)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.forward_dense(x)
        tokens = model.forward_tokens(x, [-1])[-1]
        visual = model.backbone.visual
        normed = visual.ln_post(tokens.x)[:, tokens.layout.patches].numpy()
        proj = visual.proj.numpy()
    np.testing.assert_allclose(out.cls.numpy(), np_last_pool(normed, 1) @ proj, rtol=1e-5, atol=1e-5)
    projected = out.patch.flatten(2).transpose(1, 2).numpy()
    assert not np.allclose(out.cls.numpy(), np_last_pool(projected, 1), atol=1e-4)
