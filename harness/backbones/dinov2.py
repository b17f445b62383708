"""DINOv2 (and DINOv2 with registers) through timm: the ``timm`` backbone family.

Why timm: DVT loads every backbone it probes as a timm model built with ``dynamic_img_size=True``
(Jiawei-Yang/Denoising-ViT@82704df ``dvt/models/vit_wrapper.py``), and DVT's released denoisers are keyed
by timm names, so the same weights and the same positional-embedding interpolation (timm
``resample_abs_pos_embed``) are used here. Token order in timm is ``[CLS, reg1..regR, patches]`` (timm
``VisionTransformer.num_prefix_tokens=5`` for the reg4 models), which :meth:`TokenLayout.standard` describes.

The dense interface returns the *final-norm* tokens (timm ``norm``), as DVT and DINOv2 probe them
(``forward_intermediates(norm=True)`` / ``get_intermediate_layers(norm=True)``, facebookresearch/dinov2@b8931f7b
``dinov2/models/vision_transformer.py``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import WeightsError
from ..registry import BACKBONE_FAMILIES, BACKBONES
from .base import Backbone, BackboneSpec, BlockParts, TokenLayout, Tokens, check_patch_multiple
from .weights import check_loaded_keys, error_line, sha256_file

# timm.data.constants.IMAGENET_DEFAULT_MEAN / _STD: the mean/std of timm's DINOv2 pretrained cfgs
# (``vit_*_patch14_dinov2.lvd142m``) and of the DVT/DINOv2 mmseg configs ([123.675, 116.28, 103.53] /
# [58.395, 57.12, 57.375] on the 0-255 scale, Jiawei-Yang/Denoising-ViT@82704df evaluation/configs/*_linear_config.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: extra ``timm.create_model`` keyword arguments per backbone id (test models shrink an architecture)
TIMM_MODEL_KWARGS: Dict[str, Dict[str, Any]] = {}
#: torch seed for building the architecture, so that a ``--random-init`` model is the same model in every
#: process (feature caches and resumed probe runs rely on it); the caller's RNG state is left untouched
RANDOM_INIT_SEED = 0


def timm_spec(id: str, arch: str, tag: str, patch: int, native: int, registers: int, description: str,
              paper: str = "") -> BackboneSpec:
    """A :class:`BackboneSpec` for a timm ViT whose weights live in timm's HF repo ``timm/<arch>.<tag>``."""
    return BackboneSpec(id=id, family="timm", arch=arch, weights_tag=tag, patch_size=patch, mean=IMAGENET_MEAN,
                        std=IMAGENET_STD, native_size=native, num_registers=registers,
                        hf_hub=f"timm/{arch}.{tag}" if tag else "", description=description, paper=paper)


# timm names: DVT's MODEL_LIST (Jiawei-Yang/Denoising-ViT@82704df dvt/models/vit_wrapper.py);
# 518 px native input = timm pretrained cfg input_size.
_DINOV2_PAPER = "Oquab et al., DINOv2 (2023)"
_REG_PAPER = "Darcet et al., Vision Transformers Need Registers (ICLR 2024)"
for _spec in (
    timm_spec("dinov2-s14", "vit_small_patch14_dinov2", "lvd142m", 14, 518, 0, "DINOv2 ViT-S/14 (LVD-142M)",
              _DINOV2_PAPER),
    timm_spec("dinov2-b14", "vit_base_patch14_dinov2", "lvd142m", 14, 518, 0, "DINOv2 ViT-B/14 (LVD-142M)",
              _DINOV2_PAPER),
    timm_spec("dinov2-l14", "vit_large_patch14_dinov2", "lvd142m", 14, 518, 0, "DINOv2 ViT-L/14 (LVD-142M)",
              _DINOV2_PAPER),
    timm_spec("dinov2-reg4-s14", "vit_small_patch14_reg4_dinov2", "lvd142m", 14, 518, 4,
              "DINOv2 ViT-S/14 with 4 registers (LVD-142M)", _REG_PAPER),
    timm_spec("dinov2-reg4-b14", "vit_base_patch14_reg4_dinov2", "lvd142m", 14, 518, 4,
              "DINOv2 ViT-B/14 with 4 registers (LVD-142M)", _REG_PAPER),
    timm_spec("dinov2-reg4-l14", "vit_large_patch14_reg4_dinov2", "lvd142m", 14, 518, 4,
              "DINOv2 ViT-L/14 with 4 registers (LVD-142M)", _REG_PAPER),
):
    BACKBONES.add(_spec.id, _spec)


def _timm_weights_only() -> Dict[str, bool]:
    """``weights_only=True`` for timm's ``load_state_dict`` where it takes the flag; older timm (1.0.3, our lower
    bound) has none, and there torch.load's own default applies, which is ``weights_only=True`` from torch 2.6
    (our lower bound; PyTorch 2.6 release notes)."""
    import inspect

    from timm.models import load_state_dict

    return {"weights_only": True} if "weights_only" in inspect.signature(load_state_dict).parameters else {}


def _create_timm_vit(spec: BackboneSpec, arch: Optional[str] = None, meta: bool = False) -> nn.Module:
    """``spec``'s timm ViT (or timm's ``arch``, for specs named after another library's model), seeded.

    ``meta``: tensors without storage, for a model whose every tensor a weights file is about to replace
    (:func:`_load_timm_weights` assigns them); skips the seconds a ViT-B's random init costs.
    """
    import contextlib

    import timm

    kwargs: Dict[str, Any] = dict(pretrained=False, num_classes=0, dynamic_img_size=True, img_size=spec.native_size)
    kwargs.update(TIMM_MODEL_KWARGS.get(spec.id, {}))
    if meta:
        kwargs["weight_init"] = "skip"
    try:
        with torch.random.fork_rng(devices=[]), (torch.device("meta") if meta else contextlib.nullcontext()):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(arch or spec.arch, **kwargs)
    except RuntimeError as e:
        # older timm (1.0.3, our lower bound) reads its stochastic-depth rates with .item() in __init__, which a
        # meta tensor refuses: build with storage then (a few seconds of random init the file replaces)
        if not meta or "meta" not in str(e):
            raise
        return _create_timm_vit(spec, arch, meta=False)
    n_reg = int(getattr(model, "num_reg_tokens", 0) or 0)
    if n_reg != spec.num_registers or getattr(model, "cls_token", None) is None:
        raise WeightsError(f"backbone {spec.id!r}: timm model {spec.arch} has {n_reg} registers and "
                           f"cls_token={getattr(model, 'cls_token', None) is not None}; the spec says "
                           f"{spec.num_registers} registers and a CLS token. Fix the spec in {__name__}.")
    return model


#: DVT's distilled ViTs (HF jjiaweiyang/DVT ``voc_distilled/<timm name>.pth``): ``{"model": state}`` where state is
#: the ``PretrainedViTWrapper`` state dict, i.e. timm keys under ``model.`` (Denoising-ViT @ 82704df,
#: main_distillation.py saves ``{"model": model.state_dict()}``; dvt/models/vit_wrapper.py holds the timm ViT as
#: ``self.model``). evaluate_dense_tasks.py falls back to the ``"denoiser"`` key for the same layout.
DVT_WRAPPER_PREFIX = "model."


def _unwrap_dvt_distilled(state: Dict[str, Any], path: str) -> Dict[str, Any]:
    """timm keys from a DVT distilled checkpoint (prefix ``model.`` stripped); other layouts unchanged.

    timm's ``load_state_dict`` already took the ``"model"`` entry; a DVT *denoiser* file (``"denoiser"`` with
    ``denoiser.*`` keys) is a method, not backbone weights, and says so.
    """
    if not isinstance(state, dict):
        raise WeightsError(f"--weights {path}: holds a {type(state).__name__}, not a state dict")
    inner = state.get("denoiser") if isinstance(state.get("denoiser"), dict) else None
    if inner is not None:
        if not (inner and all(str(k).startswith(DVT_WRAPPER_PREFIX) for k in inner)):
            raise WeightsError(f"--weights {path} is a DVT denoiser (key 'denoiser'), not backbone weights; use "
                               f"--method dvt --method-weights {path}")
        state = inner
    if state and all(str(k).startswith(DVT_WRAPPER_PREFIX) for k in state):
        return {k[len(DVT_WRAPPER_PREFIX):]: v for k, v in state.items()}
    return state


def _load_timm_weights(model: nn.Module, spec: BackboneSpec, path: str,
                       state: Optional[Dict[str, Any]] = None) -> None:
    """Load a timm-format, original DINOv2 or DVT-distilled checkpoint (timm's ``checkpoint_filter_fn`` converts
    the original DINOv2 layout; :func:`_unwrap_dvt_distilled` strips DVT's ``model.`` prefix). ``state``: the
    file's state dict when a caller has already read and unwrapped it."""
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    weights_only = _timm_weights_only()
    try:
        if state is None:
            state = _unwrap_dvt_distilled(load_state_dict(path, use_ema=False, **weights_only), path)
        state = checkpoint_filter_fn(state, model)
        on_meta = any(p.is_meta for p in model.parameters())  # built by _create_timm_vit(meta=True)
        if on_meta:  # assigned tensors keep their dtype: float32 like a normally built model (fp16 files exist)
            state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=on_meta)
    except WeightsError:
        raise
    except Exception as e:  # unreadable file, wrong shapes (another architecture), ...
        raise WeightsError(f"--weights {path}: could not load into {spec.arch} for backbone {spec.id!r}: "
                           f"{error_line(e)}. "
                           f"Pass the timm or original DINOv2 checkpoint of this architecture.") from e
    # the classifier head is absent by design (num_classes=0); anything else missing is a wrong file
    missing = [k for k in missing if not k.startswith("head.")]
    unexpected = [k for k in unexpected if not k.startswith(("head.", "mask_token"))]
    check_loaded_keys(model, missing, unexpected, f"--weights {path} does not match {spec.arch} (backbone {spec.id!r})",
                      ". Is it the checkpoint of another model size?")


@BACKBONE_FAMILIES.register("timm")
class TimmViTBackbone(Backbone):
    """Adapter over timm's ``VisionTransformer`` (DINOv2, DINOv2-reg and any timm ViT with a CLS token)."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights_id: str) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights_id = weights_id
        if int(model.patch_embed.patch_size[0]) != spec.patch_size:
            raise WeightsError(f"backbone {spec.id!r}: timm model patch size {model.patch_embed.patch_size} "
                               f"differs from the spec's {spec.patch_size}")

    @classmethod
    def build(cls, spec: BackboneSpec, weights_path: Optional[str]) -> "TimmViTBackbone":
        """Build ``spec``'s architecture; load ``weights_path`` (None = random init, ``weights_id`` "random-init")."""
        model = _create_timm_vit(spec)
        if weights_path is None:
            return cls(spec, model.eval(), "random-init")
        _load_timm_weights(model, spec, weights_path)
        return cls(spec, model.eval(), sha256_file(weights_path))

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    @property
    def width(self) -> int:
        return int(self.model.embed_dim)

    def embed(self, images: torch.Tensor) -> Tokens:
        """Patch embed, interpolated position embedding (timm ``dynamic_img_size``) and prefix tokens."""
        check_patch_multiple(images, self.spec.patch_size)
        m = self.model
        x = m.patch_embed(images)  # (B, h, w, D) with dynamic_img_size
        grid = (int(x.shape[1]), int(x.shape[2]))
        x = m.patch_drop(m._pos_embed(x))
        return Tokens(x, TokenLayout.standard(grid, has_cls=True, num_registers=self.spec.num_registers))

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm_pre(x)

    def block(self, i: int) -> BlockParts:
        blk = self.model.blocks[i]
        attn = blk.attn
        heads, head_dim = int(attn.num_heads), int(attn.head_dim)
        if getattr(attn, "gate", None) is not None:
            raise WeightsError(f"backbone {self.spec.id!r}: gated attention cannot be decomposed into BlockParts")
        if not hasattr(blk.mlp, "act") or not hasattr(blk.mlp, "fc1"):
            raise WeightsError(f"backbone {self.spec.id!r}: block {i} has no plain fc1/act/fc2 MLP "
                               f"({type(blk.mlp).__name__}); its hidden units cannot be hooked")

        def qkv(y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            b, n, _ = y.shape
            q, k, v = attn.qkv(y).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            return attn.q_norm(q), attn.k_norm(k), v

        # older timm Attention (e.g. 1.0.3, our lower bound) has no `norm` (scale-norm before proj): identity
        attn_norm = getattr(attn, "norm", None)
        out_proj: nn.Module = (attn.proj if attn_norm is None or isinstance(attn_norm, nn.Identity)
                               else nn.Sequential(attn_norm, attn.proj))
        return BlockParts(norm1=blk.norm1, qkv=qkv, out_proj=out_proj, norm2=blk.norm2, mlp=blk.mlp,
                          mlp_act=blk.mlp.act, mlp_hidden=int(blk.mlp.fc1.out_features), num_heads=heads, run=blk,
                          ls1=blk.ls1, ls2=blk.ls2)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """timm's final ``norm`` on all tokens (DINOv2's final LayerNorm)."""
        return self.model.norm(x)
