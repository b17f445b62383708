"""Test-time registers (Jiang, Dravid, Efros, Gandelsman, NeurIPS 2025, arXiv:2506.08010).

High-norm artifact tokens are written by a few MLP "register neurons". At test time one zero token is
appended after the patches (after the positional embedding, before the pre-norm, with no positional
embedding) and, at every layer with listed neurons, a hook on the MLP hidden units (after the
non-linearity, before the output projection):

* takes ``m``, the signed value of largest magnitude over all tokens and the layer's listed units,
* writes ``m`` into the added token for those units,
* sets those units to zero on the patch tokens (CLS and the backbone's own registers are left alone).

This follows the authors' hook (github.com/nickjiang2378/test-time-registers @ cddce29,
``hook_fn.py::activate_on_registers`` in its ``shared`` package, defaults ``scale=1``,
``normal_values="zero"``), except that
``m`` is taken per image: their hook edits batch element 0 only (their issue #5), so a batch there is not
the same as the images one at a time; here it is. The added token is not part of the dense output.

The neurons come from ``--method-weights FILE``: a JSON file whose ``"neurons"`` is a ranked list of
``[layer, unit]`` pairs (0-based block index, index into the MLP hidden units) and whose ``"backbone"``
names the backbone id it was found on (``harness ttr find-neurons`` writes one). For ``dinov2-l14`` the
authors' released list is used when no file is given.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch

from ..backbones.base import Backbone, Tokens
from ..errors import WeightsError
from ..registry import METHODS
from .base import LayerHook, Method

TOKEN_KIND = "added:ttr"
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
#: neuron lists shipped with the package, per backbone id
PACKAGED_NEURONS = {"dinov2-l14": os.path.join(DATA_DIR, "ttr-dinov2-l14.json")}
FILE_FORMAT = ('a JSON object with "backbone" (the backbone id) and "neurons": [[layer, unit], ...] '
               '(0-based block index, MLP hidden unit)')


def read_neuron_file(path: str) -> Dict[str, Any]:
    """Parse a neuron file; raise :class:`WeightsError` naming the file and the expected format."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"--method-weights {path}: not a test-time-register neuron file ({e}); "
                           f"expected {FILE_FORMAT}") from e
    neurons = data.get("neurons") if isinstance(data, dict) else None
    ok = isinstance(neurons, list) and neurons and all(
        isinstance(n, (list, tuple)) and len(n) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                             for v in n) for n in neurons)
    if not ok or not isinstance(data.get("backbone"), str):
        raise WeightsError(f"--method-weights {path}: not a test-time-register neuron file; expected {FILE_FORMAT}")
    return data


def neurons_by_layer(path: str, backbone: Backbone) -> Dict[int, List[int]]:
    """The file's neurons grouped by block, checked against ``backbone`` (id, depth, MLP width)."""
    data = read_neuron_file(path)
    if data["backbone"] != backbone.spec.id:
        raise WeightsError(f"--method-weights {path}: neurons were found on backbone {data['backbone']!r}, "
                           f"not {backbone.spec.id!r}; run `harness ttr find-neurons --backbone "
                           f"{backbone.spec.id} ...` for this one")
    out: Dict[int, List[int]] = {}
    n = backbone.num_blocks
    for layer, unit in data["neurons"]:
        if not 0 <= layer < n:
            raise WeightsError(f"--method-weights {path}: layer {layer} is out of range for {backbone.spec.id!r} "
                               f"(blocks 0..{n - 1})")
        width = backbone.block(layer).mlp_hidden
        if not 0 <= unit < width:
            raise WeightsError(f"--method-weights {path}: unit {unit} of layer {layer} is out of range "
                               f"(the MLP of {backbone.spec.id!r} has {width} hidden units)")
        if unit not in out.setdefault(layer, []):
            out[layer].append(unit)
    return out


def signmax(values: torch.Tensor) -> torch.Tensor:
    """Per row of (B, N): the entry of largest magnitude with its sign, shape (B,)."""
    idx = values.abs().argmax(dim=1, keepdim=True)
    return values.gather(1, idx)[:, 0]


@METHODS.register("ttr")
class TTRegisters(Method):
    """Test-time registers: one added token takes the register neurons' signed maximum (Jiang et al. 2025)."""

    TOUCHES = ("tokens", "layers")
    WEIGHTS = "required"
    WEIGHTS_HELP = ("a register-neuron file (JSON); make one with `harness ttr find-neurons --backbone ID "
                    "--images DIR --out FILE`")
    # the authors' defaults (nickjiang2378/test-time-registers@cddce29 hook_fn.py: one register, scale 1,
    # normal_values "zero")
    CONFIG = {"registers": 1, "position": "after_patches", "positional_embedding": False, "scale": 1.0,
              "patch_values": "zero", "signmax": "per image"}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.neurons: Dict[int, List[int]] = {}

    def bind(self, backbone: Backbone, weights_path: Optional[str]) -> Optional[str]:
        path = self.require_weights(backbone, weights_path or PACKAGED_NEURONS.get(backbone.spec.id))
        self.neurons = neurons_by_layer(path, backbone)
        return path

    def add_tokens(self, backbone: Backbone, tokens: Tokens) -> Tokens:
        b, _, d = tokens.x.shape
        return tokens.insert(TOKEN_KIND, tokens.x.new_zeros(b, 1, d), "after_patches")

    def layer_hooks(self, backbone: Backbone) -> Dict[int, LayerHook]:
        return {layer: self._hook(units) for layer, units in self.neurons.items()}

    def _hook(self, units: List[int]) -> LayerHook:
        def hook(act: torch.Tensor, tokens: Tokens) -> torch.Tensor:
            idx = torch.tensor(units, device=act.device)
            sel = act.index_select(-1, idx)  # (B, L, J)
            m = signmax(sel.reshape(sel.shape[0], -1)) * float(self.CONFIG["scale"])
            out = act.clone()
            p, r = tokens.layout.patches, tokens.layout.span(TOKEN_KIND)
            out[:, p.start:p.stop, idx] = 0
            out[:, r.start:r.stop, idx] = m.view(-1, 1, 1).to(act.dtype)
            return out

        return hook
