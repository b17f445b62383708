"""NACLIP (Hajimiri et al., WACV 2025): neighbourhood attention in the last block."""
from ..registry import METHODS
from .last_block import LastBlockMethod


@METHODS.register("naclip")
class NACLIP(LastBlockMethod):
    """softmax(k kᵀ s + Ω), Gaussian Ω with σ = 5 patches, no residual, no FFN (sinahmr/NACLIP: arch='reduced')."""

    CONFIG = {"kernel": "kk+gauss", "residual": False, "ffn": False}
    PARAMS = {"sigma": 5.0}  # NACLIP default gaussian_std=5.0 (sinahmr/NACLIP naclip.py)
