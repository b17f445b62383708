"""Build the object every evaluator receives: backbone id + weights + method -> :class:`DenseModel`."""
from __future__ import annotations

from typing import Any, Dict, Optional

from .backbones.base import BackboneSpec, DenseModel
from .backbones.weights import resolve_weights
from .registry import BACKBONE_FAMILIES, BACKBONES, METHODS


def get_backbone_spec(backbone: str) -> BackboneSpec:
    return BACKBONES.get(backbone)


def build_dense_model(backbone: str, method: str = "vanilla", params: Optional[Dict[str, Any]] = None,
                      weights: Optional[str] = None, random_init: bool = False,
                      allow_download: bool = False) -> DenseModel:
    """Create a frozen, eval-mode dense model.

    Example::

        model = build_dense_model("clip-b16-openai", "naclip", random_init=True)
        feats = model.forward_dense(torch.randn(1, 3, 224, 336))  # feats.patch: (1, 512, 14, 21)

    Args:
        backbone: registered backbone id (``harness list backbones``).
        method: registered method name (``harness list methods``).
        params: method parameters; unknown keys raise.
        weights: explicit weights file (``--weights``); otherwise the local caches are searched.
        random_init: same architecture, random weights (tests, demo). Records say ``random-init``.
        allow_download: let the libraries fetch missing weights (needs network).
    """
    spec = get_backbone_spec(backbone)
    family = BACKBONE_FAMILIES.get(spec.family)
    path = None if random_init else resolve_weights(spec, weights, allow_download)
    bb = family.build(spec, path)
    bb.requires_grad_(False)
    model = METHODS.get(method)(bb, **(params or {}))
    return model.eval()
