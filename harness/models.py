"""Build the object every evaluator receives: backbone id + weights + method (+ method weights) -> DenseModel."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Union

from .backbones.base import Backbone, BackboneSpec
from .backbones.weights import resolve_weights, sha256_file
from .errors import ConfigError, WeightsError
from .methods.base import DenseModel, Method, check_composition, split_composition
from .registry import BACKBONE_FAMILIES, BACKBONES, METHODS, RegistryError

MethodWeights = Union[None, str, Mapping[str, str]]


def get_backbone_spec(backbone: str) -> BackboneSpec:
    return BACKBONES.get(backbone)


def canonical_method(method: str) -> str:
    """The canonical name of a method or composition (aliases resolved, parts in the order they act)."""
    parts = [METHODS.get(n)() for n in _part_names(method)]
    return "+".join(p.name for p in check_composition(parts))


def _part_names(method: str) -> List[str]:
    return [METHODS.canonical(n) for n in split_composition(method)]


def parse_method_weights(value: Optional[str]) -> MethodWeights:
    """``--method-weights FILE`` or ``PART=FILE,PART=FILE`` -> what :func:`build_dense_model` takes."""
    if not value:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if len(items) == 1 and "=" not in items[0]:
        return os.path.expanduser(items[0])
    out: Dict[str, str] = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"--method-weights {value!r}: with several files write PART=FILE,PART=FILE")
        k, v = it.split("=", 1)
        try:
            part = METHODS.canonical(k.strip())
        except RegistryError as e:
            raise ConfigError(f"--method-weights {it}: {e}") from e
        out[part] = os.path.expanduser(v.strip())
    return out


def _route_params(parts: List[str], params: Mapping[str, Any], method: str) -> Dict[str, Dict[str, Any]]:
    """Send ``--param`` values to the parts that declare them (``part.name=value`` when ambiguous)."""
    out: Dict[str, Dict[str, Any]] = {p: {} for p in parts}
    for key, value in params.items():
        if "." in key:
            part, name = key.split(".", 1)
            part = METHODS.canonical(part)
            if part not in out:
                raise ConfigError(f"--param {key}: {part!r} is not a part of method {method!r}")
            out[part][name] = value
            continue
        owners = [p for p in parts if key in METHODS.get(p).PARAMS]
        if len(parts) == 1:
            owners = parts  # the part reports an unknown parameter itself, listing the valid ones
        if not owners:
            valid = sorted(f"{p}.{k}" for p in parts for k in METHODS.get(p).PARAMS)
            raise ConfigError(f"method {method!r} has no parameter {key!r}; valid: {', '.join(valid) or 'none'}")
        if len(owners) > 1:
            raise ConfigError(f"--param {key}: several parts of {method!r} take it; write "
                              f"{' or '.join(f'{o}.{key}' for o in owners)}")
        out[owners[0]][key] = value
    return out


def _route_weights(parts: List[Method], method_weights: MethodWeights, method: str) -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {p.name: None for p in parts}
    if method_weights is None:
        return out
    takers = [p.name for p in parts if p.WEIGHTS]
    if isinstance(method_weights, str):
        if len(takers) != 1:
            what = "no part takes weights" if not takers else f"parts {', '.join(takers)} take weights"
            raise ConfigError(f"--method-weights {method_weights}: method {method!r}: {what}"
                              + ("; write PART=FILE for each" if takers else ""))
        out[takers[0]] = method_weights
        return out
    for name, path in method_weights.items():
        if name not in out:
            raise ConfigError(f"--method-weights {name}={path}: {name!r} is not a part of method {method!r}")
        out[name] = path
    return out


def attach_method(backbone: Backbone, method: str = "vanilla", params: Optional[Mapping[str, Any]] = None,
                  method_weights: MethodWeights = None) -> DenseModel:
    """A :class:`DenseModel` of an already built backbone (several methods of one pass share it)."""
    names = _part_names(method)
    routed = _route_params(names, dict(params or {}), method)
    parts = [METHODS.get(n)(**routed[n]) for n in names]
    parts = check_composition(parts)
    name = "+".join(p.name for p in parts)
    weights = _route_weights(parts, method_weights, name)
    hashes: Dict[str, str] = {}
    for part in parts:
        path = weights[part.name]
        if path is not None and not os.path.isfile(path):
            raise WeightsError(f"--method-weights {path}: no such file (weights of method part {part.name!r})")
        used = part.bind(backbone, path)
        if used is not None:
            hashes[part.name] = sha256_file(used)
    model = DenseModel(backbone, parts, name=name)
    model.method_weights = hashes
    model.parts.requires_grad_(False)  # frozen like the backbone; a trainer unfreezes what it trains
    model.to(next(backbone.parameters()).device)
    return model.eval()


def build_dense_model(backbone: str, method: str = "vanilla", params: Optional[Dict[str, Any]] = None,
                      weights: Optional[str] = None, method_weights: MethodWeights = None,
                      random_init: bool = False, allow_download: bool = False) -> DenseModel:
    """Create a frozen, eval-mode dense model.

    Example::

        model = build_dense_model("clip-b16-openai", "ttr+naclip", method_weights="neurons.json",
                                  random_init=True)
        feats = model.forward_dense(torch.randn(1, 3, 224, 336))  # feats.patch: (1, 512, 14, 21)

    Args:
        backbone: registered backbone id (``harness list backbones``).
        method: registered method name, or a composition ``a+b`` (``harness list methods``).
        params: method parameters; unknown keys raise. In a composition, ``part.name`` picks the part.
        weights: explicit backbone weights file (``--weights``); otherwise the local caches are searched.
        method_weights: a file for the one weighted part, or ``{part: file}`` (``--method-weights``).
        random_init: same architecture, random weights (tests, demo). Records say ``random-init``.
        allow_download: let the libraries fetch missing weights (needs network).
    """
    spec = get_backbone_spec(backbone)
    canonical_method(method)  # unknown or incompatible parts fail before the weights are loaded
    family = BACKBONE_FAMILIES.get(spec.family)
    path = None if random_init else resolve_weights(spec, weights, allow_download)
    bb = family.build(spec, path)
    bb.requires_grad_(False)
    return attach_method(bb.eval(), method, params, method_weights)
