"""Dense features -> RGB, with one projection fitted on every method and image of a run.

Fitting once over all tokens (not per image or per method) is what makes the colours comparable: the
same feature vector gets the same colour wherever it appears, so a method whose map changes colour has
changed its features. Tokens are L2-normalised first: methods of one backbone differ in feature scale
by orders of magnitude (ClearCLIP drops the residual, MaskCLIP keeps only the value path), and without
it the largest-scale method would own the principal axes; the norms have their own row in the figure.
"""
from __future__ import annotations

import warnings
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError

#: colour channels of the projection
COMPONENTS = 3
#: our choice: each channel is stretched between these joint percentiles (not min/max), so that a few
#: extreme artifact tokens do not compress every other token into one colour
PERCENTILE_RANGE = (1.0, 99.0)
PROJECTIONS = ("pca", "umap")
UMAP_MISSING = "--umap needs umap-learn: pip install 'harness[viz]' (or pip install umap-learn)"


def unit_tokens(patch: torch.Tensor) -> np.ndarray:
    """(C, h, w) features -> (h*w, C) float64 tokens of unit L2 norm (row-major over the grid)."""
    x = patch.detach().double().flatten(1).T.cpu().numpy()
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)


def fit_pca(tokens: np.ndarray, k: int = COMPONENTS) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (C,) and the top-``k`` principal axes (k, C) of (N, C) tokens.

    The axes are the leading eigenvectors of the covariance (C x C, cheap for any number of tokens);
    each axis' sign is fixed so that its largest-magnitude loading is positive, so the colours do not
    flip between runs or machines.
    """
    if tokens.shape[0] < 2:
        raise ConfigError(f"the projection needs at least 2 feature tokens, got {tokens.shape[0]}")
    mean = tokens.mean(axis=0)
    centred = tokens - mean
    cov = centred.T @ centred / (tokens.shape[0] - 1)
    vals, vecs = np.linalg.eigh(cov)
    axes = vecs[:, np.argsort(vals)[::-1][:k]].T
    signs = np.sign(axes[np.arange(axes.shape[0]), np.abs(axes).argmax(axis=1)])
    return mean, axes * np.where(signs == 0, 1.0, signs)[:, None]


def umap_embed(tokens: np.ndarray, k: int = COMPONENTS, seed: int = 0) -> np.ndarray:
    """(N, C) tokens -> (N, k) UMAP coordinates (cosine metric; fixed seed, so runs repeat)."""
    try:
        import umap
    except ImportError as e:
        raise ConfigError(UMAP_MISSING) from e
    # n_neighbors 15 and min_dist 0.1 are umap-learn's defaults (umap-learn 0.5, umap/umap_.py UMAP.__init__)
    reducer = umap.UMAP(n_components=k, metric="cosine", random_state=seed, n_neighbors=15, min_dist=0.1)
    with warnings.catch_warnings():  # a fixed seed makes umap-learn run single-threaded, and it says so
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        return np.asarray(reducer.fit_transform(tokens), dtype=np.float64)


def stretch(coords: np.ndarray, lo_hi: Tuple[float, float] = PERCENTILE_RANGE) -> np.ndarray:
    """(N, k) coordinates -> [0, 1] per channel, between the channel's ``lo_hi`` percentiles over all N."""
    lo, hi = np.percentile(coords, lo_hi, axis=0)
    return np.clip((coords - lo) / np.maximum(hi - lo, np.finfo(np.float64).eps), 0.0, 1.0)


def joint_colours(features: Sequence[torch.Tensor], projection: str = "pca", seed: int = 0) -> List[np.ndarray]:
    """RGB maps (h, w, 3) in [0, 1] for a list of (C, h, w) feature maps, from one joint fit over all of them."""
    if projection not in PROJECTIONS:
        raise ConfigError(f"unknown projection {projection!r}; one of {', '.join(PROJECTIONS)}")
    if not features:
        raise ConfigError("no feature maps to project")
    tokens = [unit_tokens(f) for f in features]
    allt = np.concatenate(tokens)
    if projection == "pca":
        mean, axes = fit_pca(allt)
        coords = (allt - mean) @ axes.T
    else:
        coords = umap_embed(allt, seed=seed)
    rgb = stretch(coords)
    out, start = [], 0
    for f, t in zip(features, tokens):
        h, w = int(f.shape[-2]), int(f.shape[-1])
        out.append(rgb[start:start + len(t)].reshape(h, w, COMPONENTS))
        start += len(t)
    return out
