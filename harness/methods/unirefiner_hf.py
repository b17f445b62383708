"""UniRefiner's file layouts: Hugging Face CLIP vision names <-> open_clip's, and the PEFT LoRA merge.

The authors' trainer (github.com/CongpeiQiu/UniRefiner @ 38f4e71b) wraps the vision tower of a Hugging Face
``CLIPModel`` (``unirefiner/models/wrappers/openai_clip.py``: a copy of ``vision_model`` with
``visual_projection`` attached) and writes two kinds of files (``unirefiner/training/checkpoint.py``):

* ``model_final.pt``: ``merge_and_unload().state_dict()`` -- a bare state dict in Hugging Face
  ``CLIPVisionTransformer`` names (``embeddings.*``, ``pre_layrnorm.*``, ``encoder.layers.N.*``,
  ``post_layernorm.*``) plus ``visual_projection.weight``, the LoRA merged into every Linear;
* ``epoch_K.pt``: ``{"state_dict": peft_model.state_dict()}`` -- the same names under ``base_model.model.``,
  each LoRA-wrapped Linear as ``X.base_layer.weight``/``.bias`` with unmerged ``X.lora_A.<adapter>.weight``
  (r, in) and ``X.lora_B.<adapter>.weight`` (out, r).

Both load onto our open_clip CLIP towers: the separate q/k/v projections become open_clip's fused
``in_proj``, ``visual_projection.weight`` (C, D) becomes ``proj`` (D, C). An epoch file is merged here as
PEFT's ``merge_and_unload`` does, ``W + (alpha / r) * B @ A``, with ``r`` read from ``lora_A`` and ``alpha``
the authors' preset (``LORA_ALPHA``; the file does not store it).

:class:`HFCLIPVision` is the same tower as an ``nn.Module`` with Hugging Face's module names, so that PEFT
wraps exactly the Linears the authors' preset wraps and ``harness distill unirefiner`` writes both files in
the authors' layouts.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.pos_embed import interpolate_patch_pos_embed_to_size
from ..errors import WeightsError

#: LoRA preset ``linear_r-8`` (unirefiner/models/lora/presets/linear_r-8.json @ 38f4e71b): r 8, alpha 16, dropout 0.1
LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.1
#: ``CLIPVisionEmbeddings.position_ids``: a non-persistent buffer in current transformers, saved by older ones
POSITION_IDS = "embeddings.position_ids"
FILE_FORMAT = ("a UniRefiner CLIP vision file: the merged Hugging Face layout (embeddings.*, pre_layrnorm.*, "
               "encoder.layers.N.*, post_layernorm.*, visual_projection.weight) or a per-epoch "
               "{'state_dict': ...} with PEFT 'base_model.model.*' keys (`harness distill unirefiner` writes both)")

# per block: Hugging Face name -> open_clip name (q/k/v are the thirds of in_proj, handled apart)
_BLOCK = {"layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
          "self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
          "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
          "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
          "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias"}
_TOP = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
        "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
        "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight",
        "post_layernorm.bias": "ln_post.bias"}
_QKV = ("q_proj", "k_proj", "v_proj")


def clip_depth(visual_state: Mapping[str, torch.Tensor]) -> int:
    return len({k.split(".")[2] for k in visual_state if k.startswith("transformer.resblocks.")})


def openclip_to_hf(visual_state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """open_clip ``visual`` tensors -> Hugging Face ``CLIPVisionTransformer`` names + ``visual_projection.weight``."""
    out = {hf: visual_state[oc] for hf, oc in _TOP.items()}
    for i in range(clip_depth(visual_state)):
        pre = f"transformer.resblocks.{i}."
        for hf, oc in _BLOCK.items():
            out[f"encoder.layers.{i}.{hf}"] = visual_state[pre + oc]
        for kind, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            for proj, part in zip(_QKV, visual_state[pre + "attn." + name].chunk(3, dim=0)):
                out[f"encoder.layers.{i}.self_attn.{proj}.{kind}"] = part
    out["visual_projection.weight"] = visual_state["proj"].t()
    return out


def hf_to_openclip(hf: Mapping[str, torch.Tensor], depth: int) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`openclip_to_hf` (every key required)."""
    out = {oc: hf[k] for k, oc in _TOP.items()}
    for i in range(depth):
        pre = f"encoder.layers.{i}."
        for k, oc in _BLOCK.items():
            out[f"transformer.resblocks.{i}.{oc}"] = hf[pre + k]
        for kind, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            out[f"transformer.resblocks.{i}.attn.{name}"] = torch.cat(
                [hf[f"{pre}self_attn.{p}.{kind}"] for p in _QKV], dim=0)
    out["proj"] = hf["visual_projection.weight"].t()
    return out


def interpolate_pos_hf(patch_pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(M*M, D) -> (h*w, D) as transformers' ``CLIPVisionEmbeddings.interpolate_pos_encoding`` (the authors' tower):
    bicubic to an explicit ``size``, ``align_corners=False``, no +0.1 offset; unchanged on the stored grid."""
    return interpolate_patch_pos_embed_to_size(patch_pos, grid)


# -- reading a file -----------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def merge_peft(state: Mapping[str, torch.Tensor], path: str, alpha: float = LORA_ALPHA) -> Dict[str, torch.Tensor]:
    """A PEFT LoRA state dict (``base_model.model.`` prefix) -> plain names with ``W + (alpha/r) B @ A`` merged."""
    prefix = "base_model.model."
    plain = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    out: Dict[str, torch.Tensor] = {}
    lora: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in plain.items():
        parts = k.split(".")
        if len(parts) >= 3 and parts[-3] in ("lora_A", "lora_B") and parts[-1] == "weight":
            lora.setdefault(".".join(parts[:-3]), {})[parts[-3]] = v
        elif ".base_layer." in k:
            out[k.replace(".base_layer.", ".")] = v
        else:
            out[k] = v
    for module, ab in lora.items():
        w = out.get(module + ".weight")
        if set(ab) != {"lora_A", "lora_B"} or w is None:
            raise WeightsError(f"--method-weights {path}: LoRA of {module} is incomplete (needs base_layer.weight, "
                               f"lora_A and lora_B); expected {FILE_FORMAT}")
        a, b = ab["lora_A"].float(), ab["lora_B"].float()
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise WeightsError(f"--method-weights {path}: LoRA of {module} has shapes A {tuple(a.shape)}, "
                               f"B {tuple(b.shape)} that do not fit the weight {tuple(w.shape)}")
        out[module + ".weight"] = w.float() + (alpha / a.shape[0]) * (b @ a)
    return out


def load_state(path: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """Read ``path`` (``weights_only=True``) -> (tensors in Hugging Face names, ``"merged"`` or ``"epoch"``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, a pickle of foreign objects
        raise WeightsError(f"--method-weights {path}: not a readable PyTorch checkpoint ({_first_line(e)}); "
                           f"expected {FILE_FORMAT}") from e
    kind = "merged"
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):  # a per-epoch file
        obj, kind = obj["state_dict"], "epoch"
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                          for k, v in obj.items()):
        raise WeightsError(f"--method-weights {path}: not a state dict of tensors; expected {FILE_FORMAT}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    if any(".lora_A." in k or k.startswith("base_model.model.") for k in state):
        state = merge_peft(state, path)
    state.pop(POSITION_IDS, None)
    return state, kind


def _some(keys: List[str]) -> str:
    shown = ", ".join(sorted(keys)[:4])
    return f"{len(keys)} {shown}{', ...' if len(keys) > 4 else ''}" if keys else "0"


def read_refined_file(path: str, visual: nn.Module, backbone_id: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """A UniRefiner file -> (open_clip ``visual`` state dict for ``visual``'s architecture, file kind).

    One :class:`WeightsError` naming the file for anything else: missing or unexpected keys, wrong shapes.
    """
    own = {k: v for k, v in visual.state_dict().items()}
    expected = openclip_to_hf(own)
    state, kind = load_state(path)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"--method-weights {path}: not a UniRefiner file for backbone {backbone_id!r}: missing "
                           f"keys: {_some(missing)}; unexpected keys: {_some(unexpected)}. Expected {FILE_FORMAT}")
    for k, ref in expected.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise WeightsError(f"--method-weights {path}: {k} has shape {tuple(state[k].shape)}, backbone "
                               f"{backbone_id!r} needs {tuple(ref.shape)}: a file of another architecture?")
    oc = hf_to_openclip({k: v.float() for k, v in state.items()}, clip_depth(own))
    return {k: oc[k].to(own[k].dtype) for k in own}, kind


# -- the tower with Hugging Face module names (what PEFT wraps) ----------------------------------------------
class _Embeddings(nn.Module):
    def __init__(self, width: int, patch: int, positions: int) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.patch_embedding = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding(positions, width)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.patch_embedding(images)
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        pos = self.position_embedding.weight
        # transformers' CLIPVisionEmbeddings.interpolate_pos_encoding: bicubic to the grid's size, no offset
        pos = torch.cat([pos[:1], interpolate_pos_hf(pos[1:], grid)], dim=0)
        return torch.cat([cls, x], dim=1) + pos.to(x.dtype), grid


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), act, nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, act: nn.Module, eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = _Attention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = _MLP(width, hidden, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, layers: List[_Layer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class HFCLIPVision(nn.Module):
    """An open_clip CLIP vision tower rebuilt with Hugging Face ``CLIPVisionTransformer`` module names.

    ``forward(images)`` returns the final tokens after ``post_layernorm`` (B, 1 + h*w, D), CLS first, and the
    patch grid: what the authors' ``encode_dense`` computes before dropping CLS. ``visual_projection`` is part
    of the module (the authors' LoRA wraps it too) but not of the forward.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        state = visual.state_dict()
        width = int(state["class_embedding"].shape[-1])
        blocks = visual.transformer.resblocks
        blk = blocks[0]
        hidden = int(blk.mlp.c_fc.out_features)
        eps = float(blk.ln_1.eps)
        patch = int(state["conv1.weight"].shape[-1])
        self.embeddings = _Embeddings(width, patch, int(state["positional_embedding"].shape[0]))
        self.pre_layrnorm = nn.LayerNorm(width, eps=float(visual.ln_pre.eps))
        self.encoder = _Encoder([_Layer(width, int(b.attn.num_heads), hidden, copy.deepcopy(b.mlp.gelu), eps)
                                 for b in blocks])
        self.post_layernorm = nn.LayerNorm(width, eps=float(visual.ln_post.eps))
        self.visual_projection = nn.Linear(width, int(state["proj"].shape[-1]), bias=False)
        self.load_state_dict({k: v.detach().float().clone() for k, v in openclip_to_hf(state).items()})

    @property
    def patch_size(self) -> int:
        return int(self.embeddings.patch_embedding.kernel_size[0])

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x, grid = self.embeddings(images)
        x = self.pre_layrnorm(x)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x), grid


def lora_targets(module: nn.Module) -> List[str]:
    """Names of every ``nn.Linear`` in ``module``: the preset's ``module_type_list: ["Linear"]``."""
    return sorted(name for name, m in module.named_modules() if isinstance(m, nn.Linear))

