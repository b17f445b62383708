"""ClearCLIP (Lan et al., ECCV 2024): q-q attention without residual and FFN."""
from ..registry import METHODS
from .last_block import LastBlockMethod


@METHODS.register("clearclip")
class ClearCLIP(LastBlockMethod):
    """softmax(q qᵀ s), residual and FFN dropped (mc-lan/ClearCLIP: model_type='ClearCLIP', ignore_residual)."""

    CONFIG = {"kernel": "qq", "residual": False, "ffn": False}
