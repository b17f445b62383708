"""Schema of ``artifacts`` protocols: label-free artifact measures and the Table S.4 Pearson score."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Literal

from ..errors import ConfigError
from .schema import Precision, TaskSchema, register_schema


@dataclass(frozen=True)
class ArtifactsSettings:
    """Resolved settings of one dataset under an ``artifacts`` protocol."""

    size_for_patch: Dict[int, int]   # patch size -> short side = square centre crop (pixels)
    views: int                       # TTA views of the consistency target, the identity included
    shift_frac: float                # largest shift of a view, as a fraction of the side
    flip_prob: float                 # horizontal-flip probability of a view
    view_seed: int                   # the view draw's seed
    fill: Literal["white"]           # pixels a shifted view brings in
    percentiles: List[int]           # of dissimilarity at which the token cosines are read
    outlier_cutoff: float            # |modified z-score| beyond which a token norm is an outlier
    ovss_protocol: str               # the ovss protocol whose settings, names and templates feed Pearson
    ovss_protocol_version: int       # pinned version of that protocol (run identity)
    precision: Precision = "fp32"    # absent = the fp32 reference


@register_schema("artifacts")
class ArtifactsSchema(TaskSchema):
    settings = ArtifactsSettings

    @classmethod
    def check_settings(cls, settings: Dict[str, Any], where: str) -> None:
        if settings["views"] < 1:
            raise ConfigError(f"{where}: views must be >= 1, got {settings['views']}")
        if not 0.0 <= settings["shift_frac"] < 1.0 or not 0.0 <= settings["flip_prob"] <= 1.0:
            raise ConfigError(f"{where}: shift_frac must be in [0, 1) and flip_prob in [0, 1]")
        if any(not 0 < p < 100 for p in settings["percentiles"]):
            raise ConfigError(f"{where}: percentiles must lie in (0, 100), got {settings['percentiles']}")
        if settings["outlier_cutoff"] <= 0:
            raise ConfigError(f"{where}: outlier_cutoff must be positive, got {settings['outlier_cutoff']}")
        if any(p <= 0 or s <= 0 or s % p for p, s in settings["size_for_patch"].items()):
            raise ConfigError(f"{where}: size_for_patch sizes must be positive multiples of their patch size, got "
                              f"{settings['size_for_patch']}")
