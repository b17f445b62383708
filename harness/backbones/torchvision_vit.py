"""torchvision's ``VisionTransformer`` checkpoints, run as the identical timm ViT: the ``torchvision`` family.

torchvision's ViT-B/16 and timm's ``vit_base_patch16_224`` are the same network (pre-norm blocks, LayerNorm
eps 1e-6, exact GELU, biased fused q/k/v, CLS first, learned positional embedding over CLS + 14 x 14 patches),
so a torchvision state dict is renamed onto timm's keys and runs through ``TimmViTBackbone``: same stages
for methods, and timm's positional-embedding interpolation for inputs other than 224 px (torchvision's model
accepts only its training size). The patch features are those after ``encoder.ln`` (timm ``norm``).

Files read: torchvision's own (``vit_b_16-c867db91.pth``: the bare state dict) and LaSt-ViT's supervised
``ViT_190k.pth`` (detectron2 checkpoint ``{"model": ...}`` of their ``ClassificationNet``, whose ``model`` is
the torchvision ``VisionTransformer`` subclass ``dense_vit``: keys ``model.<torchvision key>``;
github.com/ChengShiest/LAST-ViT @ cdeb884a, cls_pretrain/conf.py and lazy_train.py).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional

import torch

from ..errors import WeightsError
from ..registry import BACKBONE_FAMILIES, BACKBONES
from .base import Backbone, BackboneSpec
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD
from .weights import check_loaded_keys, sha256_file

#: torchvision model name -> the timm architecture with the same layout
TIMM_ARCH = {"vit_b_16": "vit_base_patch16_224"}
#: the prefix of LaSt-ViT's ``ClassificationNet`` (``self.model = model``, cls_pretrain/conf.py @ cdeb884a)
CLASSIFICATION_NET_PREFIX = "model."

# torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1 (torchvision 0.29 models/vision_transformer.py): the file
# URL, 224 px crop after a 256 px resize, ImageNet mean/std (torchvision ImageClassification defaults).
VIT_B_16_IN1K_URL = "https://download.pytorch.org/models/vit_b_16-c867db91.pth"

BACKBONES.add("vit-b16-tv-in1k", BackboneSpec(
    id="vit-b16-tv-in1k", family="torchvision", arch="vit_b_16", weights_tag="IMAGENET1K_V1", patch_size=16,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, native_size=224, url=VIT_B_16_IN1K_URL,
    description="supervised ViT-B/16, torchvision IMAGENET1K_V1 (ImageNet-1k)",
    paper="Dosovitskiy et al., An Image is Worth 16x16 Words (ICLR 2021)"))

#: keys every torchvision ``VisionTransformer`` state dict has
LAYOUT_KEYS = ("conv_proj.weight", "encoder.pos_embedding")
_LAYER = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")
_BLOCK_PARTS = {"ln_1": "norm1", "ln_2": "norm2", "self_attention.in_proj_weight": "attn.qkv.weight",
                "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj": "attn.proj",
                "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2", "mlp.linear_1": "mlp.fc1", "mlp.linear_2": "mlp.fc2"}
_TOP = {"class_token": "cls_token", "conv_proj.weight": "patch_embed.proj.weight",
        "conv_proj.bias": "patch_embed.proj.bias", "encoder.pos_embedding": "pos_embed",
        "encoder.ln.weight": "norm.weight", "encoder.ln.bias": "norm.bias"}


def torchvision_to_timm(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a torchvision ``VisionTransformer`` state dict onto timm ``VisionTransformer`` keys.

    ``in_proj_weight`` is (3D, D) with rows q, k, v, the order of timm's fused ``qkv``; ``mlp.0``/``mlp.3`` are the
    two linears of torchvision's ``MLPBlock`` (``linear_1``/``linear_2`` in torchvision < 0.13 files). The
    classifier (``heads.*``) is dropped. Unknown keys are kept as they are, so that the load reports them.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("heads."):
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        m = _LAYER.match(key)
        if m:
            rest = m.group(2)
            for old, new in _BLOCK_PARTS.items():
                if rest == old or rest.startswith(old + "."):
                    out[f"blocks.{m.group(1)}.{new}{rest[len(old):]}"] = value
                    break
            else:
                out[key] = value
            continue
        out[key] = value
    return out


def read_torchvision_state(path: str) -> Dict[str, torch.Tensor]:
    """The torchvision state dict in ``path``: bare, or a detectron2 checkpoint of LaSt-ViT's
    ``ClassificationNet`` (``{"model": {"model.<key>": ...}, "iteration": ..., ...}``)."""
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects other than tensors
        raise WeightsError(f"--weights {path}: not a readable torch checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}). Pass the torchvision ViT state dict "
                           f"or LaSt-ViT's ViT_190k.pth.") from e
    if not isinstance(obj, dict):
        raise WeightsError(f"--weights {path}: holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if obj and all(str(k).startswith(CLASSIFICATION_NET_PREFIX) for k in obj):
        obj = {k[len(CLASSIFICATION_NET_PREFIX):]: v for k, v in obj.items()}
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"--weights {path}: entries {bad[:3]} are not tensors; expected a ViT state dict")
    if not all(k in obj for k in LAYOUT_KEYS):  # e.g. a timm or DINO file: another layout, refused by name
        raise WeightsError(f"--weights {path}: not a torchvision VisionTransformer state dict (no "
                           f"{' / '.join(LAYOUT_KEYS)}; keys like {list(obj)[:3]})")
    return obj


def load_torchvision_weights(model: torch.nn.Module, spec: BackboneSpec, path: str,
                             state: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Load a torchvision-layout checkpoint (``state``: the file's, already read) into the timm model; one clear
    error for any other file."""
    state = torchvision_to_timm(read_torchvision_state(path) if state is None else state)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # float32, as if built normally
    try:  # a model built on the meta device (no storage) takes the file's tensors as they are
        missing, unexpected = model.load_state_dict(state, strict=False,
                                                    assign=any(p.is_meta for p in model.parameters()))
    except RuntimeError as e:  # shape mismatch: another model size
        raise WeightsError(f"--weights {path}: does not fit torchvision {spec.arch} (backbone {spec.id!r}): "
                           f"{str(e).splitlines()[-1].strip()}") from e
    missing = [k for k in missing if not k.startswith("head.")]
    check_loaded_keys(model, missing, unexpected,
                      f"--weights {path} is not a torchvision {spec.arch} checkpoint (backbone {spec.id!r})")


@BACKBONE_FAMILIES.register("torchvision")
class TorchvisionViTFamily:
    """Backbone family ``torchvision``: a torchvision ViT checkpoint run as the identical timm ViT (module doc;
    the adapter is imported at build time: the registry imports this module while ``dinov2.py`` may still be
    executing)."""

    @staticmethod
    def build(spec: BackboneSpec, weights_path: Optional[str]) -> Backbone:
        from .dinov2 import TimmViTBackbone, _create_timm_vit

        if spec.arch not in TIMM_ARCH:
            raise WeightsError(f"backbone {spec.id!r}: no timm twin for torchvision {spec.arch!r}; known: "
                               f"{', '.join(TIMM_ARCH)}")
        state = None if weights_path is None else read_torchvision_state(weights_path)  # fails before the build
        model = _create_timm_vit(spec, TIMM_ARCH[spec.arch], meta=state is not None)
        if weights_path is None or state is None:
            return TimmViTBackbone(spec, model.eval(), "random-init")
        load_torchvision_weights(model, spec, weights_path, state)
        return TimmViTBackbone(spec, model.eval(), sha256_file(weights_path))
