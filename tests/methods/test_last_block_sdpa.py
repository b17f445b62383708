"""The fused (SDPA) last-block kernels give the numbers of the papers' explicit formulas.

Reference: the kernels re-written in numpy (float64) from the formulas in harness/methods/last_block.py's
docstring (MaskCLIP, SCLIP, ClearCLIP, NACLIP), and a whole dense forward of each method with the explicit
kernel swapped in.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.backbones.base import TokenLayout
from harness.methods.last_block import KERNELS, LastBlockMethod
from harness.models import build_dense_model


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_kernel(kernel: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, grid, sigma: float) -> np.ndarray:
    s = q.shape[-1] ** -0.5
    if kernel == "identity":
        return v
    if kernel == "qk":
        a = _softmax(q @ np.swapaxes(k, -1, -2) * s)
    elif kernel == "qq":
        a = _softmax(q @ np.swapaxes(q, -1, -2) * s)
    elif kernel == "qq+kk":
        a = _softmax(q @ np.swapaxes(q, -1, -2) * s) + _softmax(k @ np.swapaxes(k, -1, -2) * s)
    else:  # NACLIP: Gaussian over patch-grid distance, CLS row/column 0 (token 0 is the CLS)
        h, w = grid
        pos = np.array([(y, x) for y in range(h) for x in range(w)], dtype=np.float64)
        d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
        omega = np.zeros((h * w + 1, h * w + 1))
        omega[1:, 1:] = np.exp(-d2 / (2 * sigma ** 2))
        a = _softmax(k @ np.swapaxes(k, -1, -2) * s + omega)
    return a @ v


@pytest.mark.parametrize("kernel", KERNELS)
def test_sdpa_kernel_matches_numpy_formula(kernel: str) -> None:
    grid = (3, 5)
    layout = TokenLayout.standard(grid, has_cls=True)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g) * 2 for _ in range(3))
    m = LastBlockMethod()
    m.kernel, m.sigma = kernel, 1.5
    got = m.attention(q, k, v, layout).double().numpy()
    ref = _numpy_kernel(kernel, q.double().numpy(), k.double().numpy(), v.double().numpy(), grid, 1.5)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(m.attention_reference(q, k, v, layout).double().numpy(), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("method", ["clip", "maskclip", "sclip", "clearclip", "naclip"])
def test_dense_features_unchanged_by_sdpa(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_dense_model("test-planted-clip", method, random_init=True)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fused = model.forward_dense(x).patch
        monkeypatch.setattr(LastBlockMethod, "attention", LastBlockMethod.attention_reference)
        explicit = model.forward_dense(x).patch
    assert fused.shape == explicit.shape
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)
