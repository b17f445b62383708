"""MaskCLIP (Zhou et al., ECCV 2022): the value path of the last block."""
from ..registry import METHODS
from .last_block import LastBlockMethod


@METHODS.register("maskclip")
class MaskCLIP(LastBlockMethod):
    """Value path only, no residual, no FFN: the form used by the PH-Reg (arXiv:2505.21501) and ClearCLIP tables."""

    CONFIG = {"kernel": "identity", "residual": False, "ffn": False}


@METHODS.register("maskclip-official")
class MaskCLIPOfficial(LastBlockMethod):
    """Value path with residual and FFN kept, as chongzhou96/MaskCLIP's backbone does."""

    CONFIG = {"kernel": "identity", "residual": True, "ffn": True}
