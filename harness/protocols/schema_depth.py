"""Schema of ``depth`` protocols: the ``faithful`` DVT NYUv2 recipe and the cached ``fast`` probe."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Tuple, Union

from ..errors import ConfigError
from .probe_settings import AdamW, AdamWGrid, ProbeCommon, check_probe_settings
from .schema import Precision, TaskSchema, register_schema

#: NYUv2 frames are 480x640 (Silberman et al., ECCV 2012); both crop boxes are given on that frame
NYU_FRAME = (480, 640)


@dataclass(frozen=True)
class DepthLoss:
    """sigloss_weight x SigLoss + gradient_weight x GradientLoss (harness/probes/losses.py)."""

    sigloss_weight: float
    sigloss_mean_weight: float       # sqrt(Var(g) + w mean(g)^2): w = 1 - lambda
    gradient_weight: float
    gradient_strides: List[int]      # subsampling strides of the multi-scale gradient loss
    log_eps: float                   # eps inside log(d + eps) in both losses


@dataclass(frozen=True)
class DepthHead:
    """Bins head normalisation p = (ReLU(z) + norm_eps) / sum."""

    norm_eps: float


@dataclass(frozen=True)
class OneCycleMomentum:
    """AdamW beta1 under mmcv's OneCycleMomentumUpdaterHook (used when ``schedule.momentum`` is ``onecycle``)."""

    base_momentum: float             # the low point, reached at pct_start of the run
    max_momentum: float              # start and end value
    pct_start: float                 # fraction of the run spent going down


@dataclass(frozen=True)
class DepthCommon(ProbeCommon):
    depth_rescale_factor: float
    min_depth: float
    max_depth: float
    eigen_crop: bool
    flip_test: bool
    n_bins: int
    upsample: int
    sigloss_warmup_iters: int
    loss: DepthLoss
    head: DepthHead
    nyu_crop_box: Tuple[int, int, int, int]    # training crop (row0, row1, col0, col1) of the 480x640 frame
    eigen_crop_box: Tuple[int, int, int, int]  # test crop (row0, row1, col0, col1) on a 480x640 frame
    onecycle_momentum: OneCycleMomentum


@dataclass(frozen=True)
class DepthFaithful(DepthCommon):
    mode: Literal["faithful"]
    rotate_prob: float
    rotate_degree: float
    flip_prob: float
    color_prob: float
    gamma_range: Tuple[float, float]
    brightness_range: Tuple[float, float]
    color_range: Tuple[float, float]
    optimizer: AdamW
    precision: Precision = "fp32"


@dataclass(frozen=True)
class DepthFast(DepthCommon):
    mode: Literal["fast"]
    optimizer: AdamWGrid
    holdout_fraction: float
    select_metric: Literal["delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"]
    precision: Precision = "fp32"
    #: version 3: the loss at the token grid (``token``), version 2 at the head's output grid
    #: (``head-output``), both against masked-mean depth; ``pixel`` = version 1
    train_loss: Literal["pixel", "head-output", "token"] = "pixel"
    #: version 4 (``token`` only): each step's loss on a random window of this share of the token grid's rows
    #: and columns per view; (1, 1) = the whole grid, version 3
    train_token_window: Tuple[float, float] = (1.0, 1.0)


@register_schema("depth")
class DepthSchema(TaskSchema):
    settings = Union[DepthFaithful, DepthFast]  # chosen by `mode`

    @classmethod
    def check_settings(cls, settings: Dict[str, Any], where: str) -> None:
        check_probe_settings(settings, where)
        if not 0 < settings["min_depth"] < settings["max_depth"]:
            raise ConfigError(f"{where}: need 0 < min_depth < max_depth, got {settings['min_depth']}, "
                              f"{settings['max_depth']}")
        if settings["n_bins"] < 2 or settings["upsample"] < 1 or not settings["loss"]["gradient_strides"]:
            raise ConfigError(f"{where}: n_bins >= 2, upsample >= 1 and at least one gradient stride are needed")
        for key in ("nyu_crop_box", "eigen_crop_box"):  # boxes on the 480x640 NYU frame
            y0, y1, x0, x1 = settings[key]
            if not (0 <= y0 < y1 <= NYU_FRAME[0] and 0 <= x0 < x1 <= NYU_FRAME[1]):
                raise ConfigError(f"{where}: {key} must be [row0, row1, col0, col1] with 0 <= row0 < row1 <= "
                                  f"{NYU_FRAME[0]} and 0 <= col0 < col1 <= {NYU_FRAME[1]}; got {list(settings[key])}")
        window = settings.get("train_token_window")
        if window is not None:
            if not all(0 < float(f) <= 1 for f in window):
                raise ConfigError(f"{where}: train_token_window must be two shares in (0, 1] of the token grid's "
                                  f"rows and columns; got {list(window)}")
            if any(float(f) != 1 for f in window) and settings.get("train_loss", "pixel") != "token":
                raise ConfigError(f"{where}: train_token_window {list(window)} needs train_loss: token (a window of "
                                  f"the token grid); train_loss is {settings.get('train_loss', 'pixel')!r}")
        m = settings["onecycle_momentum"]
        if not (0 <= m["base_momentum"] <= m["max_momentum"] < 1 and 0 < m["pct_start"] < 1):
            raise ConfigError(f"{where}: onecycle_momentum needs 0 <= base_momentum <= max_momentum < 1 and "
                              f"0 < pct_start < 1; got {m}")
