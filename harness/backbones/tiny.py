"""Tiny *test* backbones: DINOv2-shaped timm ViTs small enough to train probes on a CPU in seconds.

They exist for tests, the demo and ``benchmarks/probe_cost.py`` only; they have no published weights,
so they always run with ``--random-init`` and their numbers mean nothing about any real model.
Layer scale starts at 1.0 (DINOv2 uses 1e-5) so that the two random blocks actually mix tokens.
"""
from __future__ import annotations

from ..registry import BACKBONES
from .dinov2 import TIMM_MODEL_KWARGS, timm_spec

_TINY = dict(embed_dim=64, depth=2, num_heads=2, init_values=1.0)

for _spec, _arch_kwargs in (
    (timm_spec("test-vit-tiny", "vit_small_patch14_reg4_dinov2", "", 14, 224, 4,
               "TEST MODEL: DINOv2-reg-shaped ViT, patch 14, depth 2, width 64, 4 registers (random init only)"),
     _TINY),
    (timm_spec("test-vit-tiny-p16", "vit_small_patch14_dinov2", "", 16, 224, 0,
               "TEST MODEL: ViT, patch 16, depth 2, width 64, no registers (random init only)"),
     dict(_TINY, patch_size=16)),
):
    BACKBONES.add(_spec.id, _spec)
    TIMM_MODEL_KWARGS[_spec.id] = _arch_kwargs
