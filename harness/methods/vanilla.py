"""Vanilla features: the unmodified last block (the "CLIP" / "DINOv2" rows of PH-Reg Tables 1 and 2).

Alias ``clip``: the name the OVSS papers give this row for CLIP backbones.
"""
from ..backbones.base import DenseModel
from ..registry import METHODS


@METHODS.register("vanilla", aliases=("clip",))
class Vanilla(DenseModel):
    """Unmodified backbone: softmax(q kᵀ s) attention, residual and FFN kept (ovss.md §1.1, CLIP row)."""

    PARAMS: dict = {}

    def __init__(self, backbone, **params):  # type: ignore[no-untyped-def]
        if params:
            from ..errors import ConfigError

            raise ConfigError(f"method 'vanilla' takes no parameters (got {', '.join(sorted(params))})")
        super().__init__(backbone)
