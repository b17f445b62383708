"""SCLIP (Wang et al., ECCV 2024): correlative self-attention in the last block."""
from ..registry import METHODS
from .last_block import LastBlockMethod


@METHODS.register("sclip")
class SCLIP(LastBlockMethod):
    """softmax(q qᵀ s) + softmax(k kᵀ s), residual and FFN kept (wangf3014/SCLIP clip/model.py)."""

    CONFIG = {"kernel": "qq+kk", "residual": True, "ffn": True}
