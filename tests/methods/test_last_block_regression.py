"""The dense interface v2 gives the last-block methods the same dense logits as the v1 interface did.

``data/last_block_logits.json`` holds cosine logits (8 seeded unit queries x 7 x 11 patches) of every
last-block method, computed by the v1 code (commit 6516c7f: ``DenseModel.forward_last``) on a ViT-B/16
whose vision parameters are set from a fixed generator, at a non-square 112 x 176 input.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from harness.models import attach_method, build_dense_model

DATA = os.path.join(os.path.dirname(__file__), "data", "last_block_logits.json")
REF = json.load(open(DATA))


def _reinit(visual: torch.nn.Module) -> None:
    """Every vision parameter from one seeded generator (independent of open_clip's own init)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(visual.named_parameters()):
            r = torch.randn(p.shape, generator=g, dtype=torch.float64).float()
            p.copy_(1 + 0.1 * r if ("ln" in name or "norm" in name) and name.endswith("weight") else 0.05 * r)


@pytest.fixture(scope="module")
def backbone():
    base = build_dense_model("clip-b16-openai", "vanilla", random_init=True)
    _reinit(base.backbone.model.visual)
    return base.backbone


@pytest.mark.parametrize("method", sorted(REF["methods"]))
def test_same_dense_logits_as_v1(backbone, method: str) -> None:
    g = torch.Generator().manual_seed(99)
    x = torch.randn(*REF["input"], generator=g)
    text = torch.randn(8, 512, generator=g)
    text = text / text.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        f = attach_method(backbone, method).forward_dense(x).patch
    f = f / f.norm(dim=1, keepdim=True)
    logits = torch.einsum("nchw,qc->nqhw", f, text)[0].flatten()
    assert float((logits - torch.tensor(REF["methods"][method])).abs().max()) < 1e-5
