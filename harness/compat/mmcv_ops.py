"""Stand-in for ``mmcv.ops`` so that mmsegmentation imports on top of ``mmcv-lite``.

Why: mmcv's compiled ops do not build against current torch (C++20 headers vs its C++17 flags), so
we install ``mmcv-lite==2.1.0``, which has no ``mmcv._ext``. mmsegmentation 1.2.2 imports
``mmcv.ops`` at import time (``point_sample`` in ``mmseg.utils``, ``sigmoid_focal_loss`` in its
losses), although nothing the harness uses (datasets, transforms, ``IoUMetric``) needs compiled ops.

``install()`` registers a small ``mmcv.ops`` module *before* mmseg is imported. It provides a
pure-PyTorch ``point_sample`` (same contract as mmcv's: points in [0, 1], ``grid_sample`` underneath)
and, for every other op, a placeholder that raises a clear error when it is used.
Call :func:`import_mmseg` instead of ``import mmseg`` anywhere in the harness.
"""
from __future__ import annotations

import sys
import types
from typing import Any

_SHIM_NAME = "mmcv.ops"


class MMCVOpUnavailable(RuntimeError):
    """Raised when code reaches a compiled mmcv op that mmcv-lite does not ship."""


def point_sample(input: Any, points: Any, align_corners: bool = False, **kwargs: Any) -> Any:
    """Sample ``input`` (N, C, H, W) at ``points`` (N, P, 2) given in [0, 1] x [0, 1] coordinates.

    Pure-PyTorch equivalent of ``mmcv.ops.point_sample`` (which itself wraps ``grid_sample``).
    Returns (N, C, P), or (N, C, Hg, Wg) for 4-D point grids.
    """
    import torch.nn.functional as F

    add_dim = points.dim() == 3
    if add_dim:
        points = points.unsqueeze(2)
    out = F.grid_sample(input, 2.0 * points - 1.0, align_corners=align_corners, **kwargs)
    return out.squeeze(3) if add_dim else out


def _unavailable(name: str) -> Any:
    if name.startswith("__"):  # module protocol lookups (__file__, __path__, ...) must stay absent
        raise AttributeError(name)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise MMCVOpUnavailable(
            f"mmcv.ops.{name} needs mmcv's compiled extension, which the harness does not install "
            "(it uses mmcv-lite; see harness/compat/mmcv_ops.py). Only point_sample is provided."
        )

    fail.__name__ = name
    fail.__qualname__ = name
    return fail


def install() -> None:
    """Register the shim as ``mmcv.ops`` unless a working compiled mmcv is already importable."""
    if _SHIM_NAME in sys.modules:
        return
    try:  # a full mmcv with compiled ops: leave it alone
        import mmcv._ext  # noqa: F401

        return
    except ImportError:
        pass
    import mmcv

    mod = types.ModuleType(_SHIM_NAME, __doc__)
    mod.point_sample = point_sample  # type: ignore[attr-defined]
    mod.__getattr__ = _unavailable  # type: ignore[attr-defined]  # PEP 562: any other op
    mod.__harness_shim__ = True  # type: ignore[attr-defined]
    sys.modules[_SHIM_NAME] = mod
    mmcv.ops = mod  # type: ignore[attr-defined]


def import_mmseg() -> types.ModuleType:
    """Install the shim, then import and return ``mmseg`` (with its datasets registered)."""
    install()
    import mmseg
    import mmseg.datasets  # noqa: F401  (registers dataset classes and transforms)

    return mmseg
