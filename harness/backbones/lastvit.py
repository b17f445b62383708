"""LaSt-ViT's released ViT-B/16 backbones (Shi, Yu, Yang, CVPR 2026, arXiv:2602.22394).

github.com/ChengShiest/LAST-ViT @ cdeb884a (README "Pre-trained Weights") releases three ViT-B/16s trained with
LaSt pooling as their global token (:mod:`harness.backbones.pooling`), one per kind of supervision:

* ``lastvit-b16-dino``: ``dino0080.pth``, trained with facebookresearch/dino (family ``dino``);
* ``lastvit-b16-clip``: ``openai_b_16.pt``, trained with mlfoundations/open_clip (family ``open_clip-checkpoint``
  below, the one class of this file);
* ``lastvit-b16-sup``: ``ViT_190k.pth``, ImageNet-1k classification with a torchvision ``VisionTransformer``
  (cls_pretrain/conf.py; family ``torchvision``).

Each id sets ``last_k = 1`` (the ``k`` of ``torch.topk`` in cls_pretrain/conf.py), so ``DenseFeatures.cls`` is
the pooled token the network was trained with: pooled over the final-normed patch tokens (torchvision
``encoder.ln``, DINO ``norm``, open_clip ``ln_post``), then, for CLIP, projected by ``proj``. Only the
supervised training code is public; for DINO and CLIP the pooling is placed where those libraries pool
(DINO returns ``norm(x)[:, 0]``; open_clip's ``VisionTransformer.forward`` runs ``ln_post``, ``_global_pool``,
then ``proj``). The patch features are the backbone's usual ones.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..errors import WeightsError
from ..registry import BACKBONE_FAMILIES, BACKBONES
from .base import Backbone, BackboneSpec
from .clip import CLIP_MEAN, CLIP_STD
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD
from .pooling import DEFAULT_K
from .weights import check_loaded_keys, sha256_file

_PAPER = "Shi, Yu, Yang, Vision Transformers Need More Than Registers (CVPR 2026, arXiv:2602.22394)"
#: the release assets, as linked from the README of ChengShiest/LAST-ViT @ cdeb884a
RELEASE = "https://github.com/ChengShiest/LAST-ViT/releases/download"
DINO_URL = f"{RELEASE}/weights/dino0080.pth"
CLIP_URL = f"{RELEASE}/weights/openai_b_16.pt"
SUP_URL = f"{RELEASE}/weights2/ViT_190k.pth"
NOTE = ("LaSt-ViT weights (the authors' release), not the official {what} weights: compare with the plain "
        "{baseline} for the recipe's effect only with that difference in mind")

# mean/std and size: the ImageNet mean/std and 224 px crops of DINO (facebookresearch/dino @ 7c446df main_dino.py
# DataAugmentationDINO) and of cls_pretrain/conf.py (T.Normalize, RandomResizedCrop(224)); open_clip's default
# OPENAI_DATASET_MEAN/STD and 224 px for an open_clip ViT-B-16 tower.
for _spec in (
    BackboneSpec(id="lastvit-b16-dino", family="dino", arch="vit_base_patch16_224", weights_tag="lastvit-dino0080",
                 patch_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD, native_size=224, url=DINO_URL,
                 description="LaSt-ViT ViT-B/16, DINO self-supervised (dino0080.pth), LaSt-pooled global token",
                 paper=_PAPER, last_k=DEFAULT_K, note=NOTE.format(what="DINO", baseline="dino-b16")),
    # QuickGELU: the file's name says OpenAI ViT-B/16 and open_clip builds `pretrained="openai"` towers with
    # QuickGELU (open_clip openai.py load_openai_model); the activation has no weights to check it by.
    BackboneSpec(id="lastvit-b16-clip", family="open_clip-checkpoint", arch="ViT-B-16-quickgelu",
                 weights_tag="lastvit-openai_b_16", patch_size=16, mean=CLIP_MEAN, std=CLIP_STD, native_size=224,
                 url=CLIP_URL, has_text=True,
                 description="LaSt-ViT CLIP ViT-B/16 (openai_b_16.pt, open_clip-trained), LaSt-pooled global token",
                 paper=_PAPER, last_k=DEFAULT_K,
                 note=NOTE.format(what="OpenAI CLIP", baseline="clip-b16-openai") + "; QuickGELU assumed"),
    BackboneSpec(id="lastvit-b16-sup", family="torchvision", arch="vit_b_16", weights_tag="lastvit-ViT_190k",
                 patch_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD, native_size=224, url=SUP_URL,
                 description="LaSt-ViT ViT-B/16, ImageNet-1k supervised (ViT_190k.pth), LaSt-pooled global token",
                 paper=_PAPER, last_k=DEFAULT_K,
                 note=NOTE.format(what="torchvision IMAGENET1K_V1", baseline="vit-b16-tv-in1k")
                 + " (about 67.4% IN-1k top-1, cls_pretrain/README.md)"),
):
    BACKBONES.add(_spec.id, _spec)

#: the state dict of an open_clip training checkpoint (open_clip main.py saves ``{"epoch", "name",
#: "state_dict", "optimizer", ...}``, keys ``module.``-prefixed under DDP; open_clip factory.py load_state_dict)
STATE_KEY, DDP_PREFIX, VISUAL_PREFIX = "state_dict", "module.", "visual."


def read_open_clip_state(path: str) -> Dict[str, torch.Tensor]:
    """The open_clip state dict in ``path``: bare or an open_clip training checkpoint (``module.`` stripped)."""
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, a TorchScript archive, other pickled objects
        raise WeightsError(f"--weights {path}: not a readable torch checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}). Pass an open_clip state dict or "
                           f"training checkpoint.") from e
    if not isinstance(obj, dict):
        raise WeightsError(f"--weights {path}: holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get(STATE_KEY), dict):
        obj = obj[STATE_KEY]
    if obj and all(str(k).startswith(DDP_PREFIX) for k in obj):
        obj = {k[len(DDP_PREFIX):]: v for k, v in obj.items()}
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"--weights {path}: entries {bad[:3]} are not tensors; expected a CLIP state dict")
    return obj


def _load_strict(module: torch.nn.Module, state: Dict[str, torch.Tensor], path: str, spec: BackboneSpec,
                 what: str) -> None:
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: another model size
        raise WeightsError(f"--weights {path}: its {what} does not fit {spec.arch} (backbone {spec.id!r}): "
                           f"{str(e).splitlines()[-1].strip()}") from e
    check_loaded_keys(module, missing, unexpected,
                      f"--weights {path}: its {what} does not match {spec.arch} (backbone {spec.id!r})")


@BACKBONE_FAMILIES.register("open_clip-checkpoint")
class OpenCLIPCheckpointFamily:
    """Backbone family ``open_clip-checkpoint``: an open_clip architecture loaded from a state-dict file that may
    lack the text tower. With a vision-only file the probes work and ``text_missing`` says why there is no text
    tower: OVSS and ``encode_text`` stop with an error naming the file. (The adapter is imported at build time:
    the registry imports this module while ``clip.py`` may still be executing.)"""

    @staticmethod
    def build(spec: BackboneSpec, weights_path: Optional[str]) -> Backbone:
        from .clip import OpenCLIPBackbone

        if weights_path is None:
            return OpenCLIPBackbone.build(spec, None)
        state = read_open_clip_state(weights_path)
        if not any(k.startswith(VISUAL_PREFIX) for k in state) and {"conv1.weight", "class_embedding"} <= set(state):
            # a bare vision tower (``model.visual.state_dict()``)
            state = {VISUAL_PREFIX + k: v for k, v in state.items()}
        visual = {k[len(VISUAL_PREFIX):]: v for k, v in state.items() if k.startswith(VISUAL_PREFIX)}
        text = {k: v for k, v in state.items() if not k.startswith(VISUAL_PREFIX)}
        if not visual:
            raise WeightsError(f"--weights {weights_path}: no vision tower (no 'visual.*' keys; e.g. "
                               f"{list(state)[:3]}); expected an open_clip {spec.arch} checkpoint")
        model = OpenCLIPBackbone.build(spec, None).model  # the architecture, seeded; the file overwrites it
        _load_strict(model.visual, visual, weights_path, spec, "vision tower")
        if text:
            if "logit_scale" in text and text["logit_scale"].ndim != model.logit_scale.ndim:
                text["logit_scale"] = text["logit_scale"].reshape(model.logit_scale.shape)
            n_text = sum(1 for k in model.state_dict() if not k.startswith(VISUAL_PREFIX))
            _load_strict(model, {**{VISUAL_PREFIX + k: v for k, v in visual.items()}, **text}, weights_path, spec,
                         f"text tower ({len(text)} non-visual tensors, {n_text} expected)")
        out = OpenCLIPBackbone(spec, model, sha256_file(weights_path))
        if not text:
            out.text_missing = (f"the weights file {weights_path} (backbone {spec.id!r}) has no text tower, only "
                                f"'visual.*' keys: zero-shot segmentation (ovss) needs one; the probes "
                                f"(linear-seg, depth) work with this file")
        return out
