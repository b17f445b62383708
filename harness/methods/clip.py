"""Vanilla features: the unmodified last block (the "CLIP" row of PH-Reg Table 1)."""
from ..backbones.base import DenseModel
from ..registry import METHODS


@METHODS.register("clip", aliases=("vanilla",))
class Vanilla(DenseModel):
    """Unmodified backbone: softmax(q kᵀ s) attention, residual and FFN kept (ovss.md §1.1, CLIP row)."""

    PARAMS: dict = {}

    def __init__(self, backbone, **params):  # type: ignore[no-untyped-def]
        if params:
            from ..errors import ConfigError

            raise ConfigError(f"method 'clip' takes no parameters (got {', '.join(sorted(params))})")
        super().__init__(backbone)
