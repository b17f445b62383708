"""DINO (v1) ViTs through timm, reading DINO's own training checkpoints too: the ``dino`` family.

DINO's ``vision_transformer.py`` has timm's ``VisionTransformer`` keys (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so a DINO
backbone runs as timm's ``vit_base_patch16_224`` (:class:`TimmViTBackbone`; patch features after ``norm``).
Files read: timm's (``timm/vit_base_patch16_224.dino``), DINO's released backbone files, and a full DINO
training checkpoint (``checkpoint0080.pth`` style, which LaSt-ViT's ``dino0080.pth`` is named after).
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

import torch

from ..errors import WeightsError
from ..registry import BACKBONE_FAMILIES, BACKBONES
from .base import Backbone, BackboneSpec
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD
from .weights import sha256_file

# A DINO training checkpoint (facebookresearch/dino @ 7c446df, main_dino.py ``save_dict``) holds ``student``
# (DDP: ``module.backbone.*``, ``module.head.*``), ``teacher`` (``backbone.*``, ``head.*``), ``optimizer``,
# ``epoch``, ``args`` (an ``argparse.Namespace``) and ``dino_loss``. DINO's evaluations take ``teacher``
# (eval_linear.py ``--checkpoint_key`` default) and strip ``module.`` and ``backbone.`` (utils.py
# ``load_pretrained_weights``); so do we. ``head.*`` is the DINO projection head, not part of the backbone.
CHECKPOINT_KEYS = ("teacher", "student")
WRAPPER_PREFIXES = ("module.", "backbone.")

BACKBONES.add("dino-b16", BackboneSpec(
    id="dino-b16", family="dino", arch="vit_base_patch16_224", weights_tag="dino", patch_size=16,
    # timm pretrained cfg ``vit_base_patch16_224.dino``: ImageNet mean/std, 224 px, HF hub repo below
    mean=IMAGENET_MEAN, std=IMAGENET_STD, native_size=224, hf_hub="timm/vit_base_patch16_224.dino",
    description="DINO ViT-B/16 (self-supervised, ImageNet-1k)",
    paper="Caron et al., Emerging Properties in Self-Supervised Vision Transformers (ICCV 2021)"))


def read_dino_state(path: str) -> Dict[str, torch.Tensor]:
    """The backbone state dict in ``path`` (timm/DINO keys): bare, safetensors, or a DINO training checkpoint
    (its ``teacher``, wrapper prefixes stripped, projection head dropped)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            # tensors only, plus the argparse.Namespace of the run's options that DINO checkpoints carry
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, other pickled objects
        raise WeightsError(f"--weights {path}: not a readable torch checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}). Pass a DINO ViT backbone state dict "
                           f"or DINO training checkpoint.") from e
    if not isinstance(obj, dict):
        raise WeightsError(f"--weights {path}: holds a {type(obj).__name__}, not a state dict")
    for key in CHECKPOINT_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    out: Dict[str, Any] = {}
    for k, v in obj.items():
        k = str(k)
        for prefix in WRAPPER_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not k.startswith("head."):
            out[k] = v
    bad = [k for k, v in out.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"--weights {path}: entries {bad[:3]} are not tensors; expected a ViT state dict")
    if "patch_embed.proj.weight" not in out:  # e.g. a torchvision or open_clip file: another layout
        raise WeightsError(f"--weights {path}: not a DINO/timm ViT state dict (no patch_embed.proj.weight; keys "
                           f"like {list(out)[:3]})")
    return out


@BACKBONE_FAMILIES.register("dino")
class DinoViTFamily:
    """Backbone family ``dino``: a timm ViT adapter loaded from timm's file, DINO's backbone file or a DINO
    training checkpoint (the adapter is imported at build time: the registry imports this module while
    ``dinov2.py`` may still be executing)."""

    @staticmethod
    def build(spec: BackboneSpec, weights_path: Optional[str]) -> Backbone:
        from .dinov2 import TimmViTBackbone, _create_timm_vit, _load_timm_weights

        state = None if weights_path is None else read_dino_state(weights_path)  # a bad file fails before the build
        model = _create_timm_vit(spec, meta=state is not None)
        if weights_path is None:
            return TimmViTBackbone(spec, model.eval(), "random-init")
        _load_timm_weights(model, spec, weights_path, state=state)
        return TimmViTBackbone(spec, model.eval(), sha256_file(weights_path))
