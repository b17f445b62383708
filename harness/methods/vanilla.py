"""Vanilla features: the unmodified backbone (the "CLIP" / "DINOv2" rows of PH-Reg Tables 1 and 2).

Alias ``clip``: the name the OVSS papers give this row for CLIP backbones.
"""
from ..registry import METHODS
from .base import Method


@METHODS.register("vanilla", aliases=("clip",))
class Vanilla(Method):
    """Unmodified backbone: softmax(q kᵀ s) attention, residual and FFN kept (PH-Reg Tables 1-2, CLIP/DINOv2)."""

    TOUCHES = ()
