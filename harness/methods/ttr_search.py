"""Finding register neurons for test-time registers (Jiang et al., NeurIPS 2025, arXiv:2506.08010).

As the authors' ``algorithms.py::find_register_neurons`` (in the repository's ``shared`` package) does
(github.com/nickjiang2378/test-time-registers @ cddce29): run images through the plain backbone; mark as
outliers the tokens (whole sequence, CLS included) whose residual-stream norm after the detection layer
exceeds a threshold; score every MLP hidden unit of every layer by its mean |activation| (after the
non-linearity) over the outlier tokens of an image; average the scores over the images that have
outliers; rank all (layer, unit) pairs together, keep layers up to the highest allowed one, take the top k.

Defaults per backbone are the authors' configs (``configs/openclip_base.yaml``, ``openai_clip_base.yaml``:
detect layer -1, threshold 30, highest layer 5, top 10; ``dinov2_large.yaml``: -2, 150, 17, 50).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Iterator, List, Optional

import torch

from ..errors import ConfigError, DataError
from .base import DenseModel


@dataclass(frozen=True)
class SearchSettings:
    """What the search depends on; written into the neuron file."""

    detect_layer: int
    norm_threshold: float
    highest_layer: int
    top_k: int


#: the authors' settings (configs/*.yaml @ cddce29), by backbone id
DEFAULTS: Dict[str, SearchSettings] = {
    **{bid: SearchSettings(-1, 30.0, 5, 10) for bid in ("clip-b16-openai", "clip-b16-laion2b", "clip-b16-dfn2b")},
    "dinov2-l14": SearchSettings(-2, 150.0, 17, 50),
}


def settings_for(backbone: str, detect_layer: Optional[int] = None, norm_threshold: Optional[float] = None,
                 highest_layer: Optional[int] = None, top_k: Optional[int] = None) -> SearchSettings:
    """The authors' defaults for ``backbone`` with any given value overriding; all four needed otherwise."""
    base = DEFAULTS.get(backbone)
    given = dict(detect_layer=detect_layer, norm_threshold=norm_threshold, highest_layer=highest_layer, top_k=top_k)
    if base is None:
        missing = [k for k, v in given.items() if v is None and k != "detect_layer"]
        if missing:
            flags = ", ".join("--" + k.replace("_", "-").replace("highest-layer", "layer-limit") for k in missing)
            raise ConfigError(f"no published register-neuron search settings for backbone {backbone!r}; "
                              f"give {flags} (inspect the per-layer token norms to choose the threshold)")
        base = SearchSettings(-1, 0.0, 0, 0)
    return SearchSettings(**{k: (v if v is not None else getattr(base, k)) for k, v in given.items()})


@contextlib.contextmanager
def _capture_hidden(model: DenseModel, layers: Iterable[int], store: Dict[int, torch.Tensor]) -> Iterator[None]:
    """Record |MLP hidden activations| (B, L, H) of ``layers`` during the forward."""
    handles = []
    for i in layers:
        def hook(module: torch.nn.Module, inputs: object, out: torch.Tensor, i: int = i) -> None:
            store[i] = out.detach().abs().float()
        handles.append(model.backbone.block(i).mlp_act.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class SearchResult:
    neurons: List[List[int]]  # ranked [layer, unit]
    scores: List[float]
    settings: SearchSettings
    images: int
    images_with_outliers: int
    outlier_tokens: int
    max_norm: float

    def to_json(self) -> Dict[str, object]:
        return {"neurons": self.neurons, "scores": self.scores, "settings": asdict(self.settings),
                "images": self.images, "images_with_outliers": self.images_with_outliers,
                "outlier_tokens": self.outlier_tokens, "max_norm_at_detect_layer": self.max_norm}


@torch.no_grad()
def find_register_neurons(model: DenseModel, batches: Iterable[torch.Tensor], settings: SearchSettings
                          ) -> SearchResult:
    """Rank MLP units by their mean |activation| on high-norm tokens (see the module doc)."""
    bb = model.backbone
    detect = bb.block_index(settings.detect_layer)
    highest = min(bb.block_index(settings.highest_layer), bb.num_blocks - 1)
    layers = list(range(highest + 1))
    total: Optional[torch.Tensor] = None
    n_img = n_with = n_tok = 0
    max_norm = 0.0
    for images in batches:
        store: Dict[int, torch.Tensor] = {}
        with _capture_hidden(model, layers, store):
            tokens = model.forward_tokens(images, [detect])[detect]
        norms = tokens.x.float().norm(dim=-1)  # (B, L)
        max_norm = max(max_norm, float(norms.max()))
        acts = torch.stack([store[i] for i in layers], dim=1)  # (B, layers, L, H)
        for b in range(images.shape[0]):
            n_img += 1
            mask = norms[b] > settings.norm_threshold
            if not bool(mask.any()):
                continue
            n_with += 1
            n_tok += int(mask.sum())
            score = acts[b][:, mask].mean(dim=1)  # (layers, H)
            total = score if total is None else total + score
    if total is None:
        raise DataError(f"no token exceeded norm {settings.norm_threshold:g} after block {detect} on {n_img} "
                        f"images (largest norm seen: {max_norm:.1f}); lower --norm-threshold or check --detect-layer")
    mean = (total / n_with).flatten()
    k = min(int(settings.top_k), mean.numel())
    vals, idx = mean.topk(k)
    width = total.shape[1]
    neurons = [[int(i) // width, int(i) % width] for i in idx]
    return SearchResult(neurons=neurons, scores=[float(v) for v in vals], settings=settings, images=n_img,
                        images_with_outliers=n_with, outlier_tokens=n_tok, max_norm=max_norm)
