"""PH-Reg: a student ViT with 16 self-distilled registers (Chen, Yan, Zhou, Dai, Luo, "Vision Transformers with
Self-Distilled Registers", NeurIPS 2025, arXiv:2505.21501, §3.2 and Appendix B.1).

``--method phreg --method-weights STUDENT`` runs the student's vision weights in place of the backbone's
(the text tower stays the backbone's, so ``--backbone clip-b16-openai --method phreg --method-weights
STUDENT`` is the usual call) and changes the forward as the authors' student modules do:

* **CLIP** (open_clip family; ``StudentCLIP`` in ``CLIP/zero_shot/models/student_CLIP.py`` @ e13242e and
  ``ModifiedImageEncoder`` in ``models/OpenaiMaskCLIP/clip_reg.py`` @ 1a6f9b8 of github.com/0raiser0/PH-Reg):
  the registers are appended *after* the patches, after the positional embedding and before ``ln_pre``,
  without a positional embedding (tokens ``[CLS, patches, reg x16]``); the last block is the MaskCLIP value
  path ``out_proj(v(ln_1(x)))`` without residual or MLP (their ``ModifiedLastLayer`` / ``ModifiedResBlock``,
  the same computation as ``--method maskclip``); ``ln_post`` and ``proj`` act on all tokens; the dense
  output is the patches (their ``[:, 1:-16]``).
* **DINOv2** (timm family, backbones without registers; ``RegDINOv2Base`` in
  ``DINOv2_full/models/studentDINOv2.py`` @ 5910d50): the registers are put *before* CLS after the
  embeddings (tokens ``[reg x16, CLS, patches]``, no positional embedding); all blocks and the final norm
  are kept (the last block is the plain block); the dense output is ``last_hidden_state[:, 17:]``.

The student's positional embedding is stored on its training grid (28 x 28 for the 448-px CLIP student,
37 x 37 for DINOv2 at 518) and re-interpolated for other inputs as the authors' code that loads that file
does; which code that is follows from the file's key layout (see ``pos_interpolation`` below):

* ``original_image_encoder.*`` + ``register_tokens`` (``ModifiedImageEncoder``: the demo notebook and the
  older ``zero_shot/segmentor.py`` @ 358e48e load the released weights into it):
  ``upsampling_pos_embedding`` calls ``F.interpolate(size=(H // 16, W // 16), mode='bicubic',
  align_corners=False)`` -- **no** +0.1 offset -- whenever the input is not 448 x 448;
* ``vit.*`` + ``register_tokens`` (``StudentCLIP``, loaded strictly by ``CLIP/zero_shot/segmentor.py`` @
  e13242e, the current evaluation code): ``interpolate_pos_encoding`` uses DINO's ``scale_factor =
  (h + 0.1) / M`` (bicubic, ``align_corners=False``); its positional embedding has shape (1, 1 + M², D);
* the DINOv2 student (Hugging Face ``Dinov2Model`` names): transformers 4.37.2 (the version the authors pin)
  ``Dinov2Embeddings.interpolate_pos_encoding``, the same +0.1 rule.

None of these antialias. ``--param pos_interpolation=size|offset`` overrides the layout's rule (``auto``).

Files ``--method-weights`` accepts (plain ``torch.save`` state dicts, read with ``weights_only=True``):

* CLIP: the authors' released student in either layout above: OpenAI visual-tower names under the prefix
  (``conv1.weight``, ``class_embedding``, ``positional_embedding``, ``ln_pre.*``,
  ``transformer.resblocks.N.*``, ``ln_post.*``, ``proj``; open_clip uses the same names) and
  ``register_tokens`` (R, D). ``harness distill phreg`` writes the ``vit.*`` layout.
* DINOv2: the state dict of ``RegDINOv2Base`` as ``DINOv2_full/distill_main.py`` saves it: Hugging Face
  ``Dinov2Model`` names under ``model.`` (mapped to timm's: the separate query/key/value become ``qkv``,
  ``layer_scaleN.lambda1`` -> ``lsN.gamma``, ``layernorm`` -> ``norm``), the same tensors again under
  ``embed.``/``encoder.``/``layernorm.`` (optional; must equal the ``model.`` ones), and ``registers``
  (1, R, D). ``harness distill phreg`` writes this layout (``embeddings.mask_token``, unused, as zeros).

Any other file stops with one error naming the file and listing missing and unexpected keys.

Released checkpoints: the authors released the distilled OpenAI CLIP ViT-B/16 student only, in the Google Drive
folder https://drive.google.com/drive/folders/1IfluySwuhvYMoUvtPEI7VxBoXUs-tgCc linked from their README
(github.com/0raiser0/PH-Reg @ 184c455, section "Demo"); the repository does not list the file names. Load it
with the OpenAI backbone weights and the student file::

    harness run ovss --backbone clip-b16-openai [--weights ViT-B-16.pt] --method phreg --method-weights STUDENT.pth

No DINOv2 student was released (their README, issue #2); train one with ``harness distill phreg``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..backbones.base import Backbone, BlockParts, EmbedOverride, TokenLayout, Tokens, check_patch_multiple
from ..backbones.pos_embed import interpolate_patch_pos_embed, interpolate_patch_pos_embed_to_size
from ..errors import ConfigError, WeightsError
from ..registry import METHODS
from .base import Method
from .maskclip import MaskCLIP

TOKEN_KIND = "added:phreg"
#: registers of the authors' students: ``num_registers=16`` (CLIP/zero_shot/segmentor.py @ e13242e) and
#: ``--num_of_reg 16`` (DINOv2_full/distill_main.py @ 5910d50); paper Appendix B.1 "16 register tokens"
NUM_REGISTERS = 16
#: key layouts of student files
LAYOUT_ORIGINAL = "original_image_encoder"  # ModifiedImageEncoder (models/OpenaiMaskCLIP/clip_reg.py @ 1a6f9b8)
LAYOUT_VIT = "vit"  # StudentCLIP (CLIP/zero_shot/models/student_CLIP.py @ e13242e)
LAYOUT_HF = "hf-dinov2"  # RegDINOv2Base (DINOv2_full/models/studentDINOv2.py @ 5910d50)
#: positional-embedding interpolation of the code that loads each layout (module docstring)
LAYOUT_INTERPOLATION = {LAYOUT_ORIGINAL: "size", LAYOUT_VIT: "offset", LAYOUT_HF: "offset"}
INTERPOLATIONS = ("auto", "size", "offset")
FILE_FORMAT = ("a PH-Reg student state dict: for CLIP 'original_image_encoder.*' or 'vit.*' visual-tower keys "
               "plus 'register_tokens'; for DINOv2 Hugging Face Dinov2Model keys under 'model.' plus 'registers' "
               "(`harness distill phreg` writes one)")


# -- positional embeddings ----------------------------------------------------------------------------
def interpolate_pos_size(patch_pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(M*M, D) -> (h*w, D) with ``F.interpolate(size=grid, mode='bicubic', align_corners=False)``.

    The rule of ``ModifiedImageEncoder.upsampling_pos_embedding`` (models/OpenaiMaskCLIP/clip_reg.py @ 1a6f9b8):
    an explicit target size, hence no +0.1 offset; unchanged on the stored grid, as their forward skips it there.
    """
    return interpolate_patch_pos_embed_to_size(patch_pos, grid)


def _interpolate(rule: str, patch_pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    if rule == "size":
        return interpolate_pos_size(patch_pos, grid)
    return interpolate_patch_pos_embed(patch_pos, grid)  # DINO's +0.1 scale factor (StudentCLIP, HF Dinov2)


# -- the student file ----------------------------------------------------------------------------------
@dataclass
class StudentWeights:
    """A student's tensors in the adapter's own names (open_clip ``visual`` / timm ``VisionTransformer``)."""

    family: str  # "open_clip" | "timm"
    layout: str  # LAYOUT_*
    vision: Dict[str, torch.Tensor]
    registers: torch.Tensor  # (R, D)

    @property
    def grid(self) -> int:
        key = "positional_embedding" if self.family == "open_clip" else "pos_embed"
        return math.isqrt(self.vision[key].reshape(-1, self.registers.shape[-1]).shape[0] - 1)


def student_family(backbone: Backbone) -> str:
    """``open_clip`` or ``timm``: the backbone families a PH-Reg student exists for (else a ConfigError)."""
    if hasattr(backbone, "visual") and hasattr(backbone.visual, "transformer"):
        return "open_clip"
    model = getattr(backbone, "model", None)
    if model is not None and hasattr(model, "blocks") and hasattr(model, "pos_embed"):
        if backbone.spec.num_registers or getattr(model, "no_embed_class", False) or model.cls_token is None:
            raise ConfigError(f"method 'phreg' on backbone {backbone.spec.id!r}: the PH-Reg DINOv2 student is "
                              f"built on a ViT with a CLS token and no registers of its own (e.g. dinov2-b14)")
        return "timm"
    raise ConfigError(f"method 'phreg' supports open_clip CLIP and timm DINOv2 backbones, not {backbone.spec.id!r}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _load_tensors(path: str) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of a foreign type, not a torch file at all
        raise WeightsError(f"--method-weights {path}: not a readable PyTorch checkpoint ({_first_line(e)}); "
                           f"expected {FILE_FORMAT}") from e
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                          for k, v in obj.items()):
        raise WeightsError(f"--method-weights {path}: not a state dict of tensors; expected {FILE_FORMAT}")
    return dict(obj)


def _key_error(path: str, backbone: Backbone, what: str, missing: List[str], unexpected: List[str]) -> WeightsError:
    def some(keys: List[str]) -> str:
        shown = ", ".join(sorted(keys)[:4])
        return f"{len(keys)} {shown}{', ...' if len(keys) > 4 else ''}" if keys else "0"

    return WeightsError(f"--method-weights {path}: not a PH-Reg student for backbone {backbone.spec.id!r} ({what}): "
                        f"missing keys: {some(missing)}; unexpected keys: {some(unexpected)}. Expected {FILE_FORMAT}")


def _check_shapes(path: str, backbone: Backbone, vision: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor],
                  pos_key: str, names: Dict[str, str]) -> None:
    """Every tensor has the backbone's shape, except the positional embedding: any square grid."""
    for k, ref in own.items():
        t = vision[k]
        if k == pos_key:
            flat = t.reshape(-1, t.shape[-1])
            if t.shape[-1] != ref.shape[-1] or t.dim() > 3 or math.isqrt(flat.shape[0] - 1) ** 2 != flat.shape[0] - 1:
                raise WeightsError(f"--method-weights {path}: {names.get(k, k)} has shape {tuple(t.shape)}; expected "
                                   f"(1 + M*M, {ref.shape[-1]}) for backbone {backbone.spec.id!r}")
        elif t.shape != ref.shape:
            raise WeightsError(f"--method-weights {path}: {names.get(k, k)} has shape {tuple(t.shape)}, backbone "
                               f"{backbone.spec.id!r} has {tuple(ref.shape)}: a student of another architecture?")


def _registers(path: str, t: torch.Tensor, width: int, name: str) -> torch.Tensor:
    regs = t.reshape(-1, t.shape[-1]) if t.dim() in (2, 3) and (t.dim() == 2 or t.shape[0] == 1) else None
    if regs is None or regs.shape[-1] != width or regs.shape[0] < 1:
        raise WeightsError(f"--method-weights {path}: {name} has shape {tuple(t.shape)}; expected (R, {width}) or "
                           f"(1, R, {width})")
    return regs.float()


def read_clip_student(path: str, backbone: Backbone, state: Dict[str, torch.Tensor]) -> StudentWeights:
    """The authors' CLIP student in the ``original_image_encoder.*`` or ``vit.*`` layout -> open_clip names."""
    own = {k: v for k, v in backbone.visual.state_dict().items()}
    prefixes = {LAYOUT_ORIGINAL: "original_image_encoder.", LAYOUT_VIT: "vit."}
    hits = {lay: sum(k.startswith(p) for k in state) for lay, p in prefixes.items()}
    layout = max(hits, key=lambda lay: (hits[lay], lay == LAYOUT_VIT))  # ties (no hit): report against vit.*
    prefix = prefixes[layout]
    expected = {prefix + k for k in own} | {"register_tokens"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise _key_error(path, backbone, f"CLIP student, layout {prefix}*", missing, unexpected)
    vision = {k: state[prefix + k].float() for k in own}
    _check_shapes(path, backbone, vision, own, "positional_embedding", {k: prefix + k for k in own})
    width = int(own["class_embedding"].shape[-1])
    vision["positional_embedding"] = vision["positional_embedding"].reshape(-1, width)  # StudentCLIP: (1, N, D)
    return StudentWeights("open_clip", layout, vision, _registers(path, state["register_tokens"], width,
                                                                   "register_tokens"))


# Hugging Face Dinov2Model <-> timm VisionTransformer names (transformers modeling_dinov2.py: Dinov2Embeddings,
# Dinov2Layer with Dinov2Attention(query/key/value, output.dense), Dinov2LayerScale(lambda1), Dinov2MLP(fc1, fc2))
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_HF_BLOCK = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
             "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
             "layer_scale1.lambda1": "ls1.gamma", "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
             "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.weight": "mlp.fc2.weight",
             "mlp.fc2.bias": "mlp.fc2.bias", "layer_scale2.lambda1": "ls2.gamma"}
_QKV = ("query", "key", "value")
_HF_MASK_TOKEN = "embeddings.mask_token"  # Dinov2Embeddings' mask token: unused by the student's forward
#: RegDINOv2Base keeps the HF modules under two names: self.model.* and self.embed/encoder/layernorm
_HF_ALIASES = (("embed.", "embeddings."), ("encoder.", "encoder."), ("layernorm.", "layernorm."))


def timm_to_hf(timm_state: Mapping[str, torch.Tensor], depth: int) -> Dict[str, torch.Tensor]:
    """timm DINOv2 tensors -> Hugging Face ``Dinov2Model`` names (no ``model.`` prefix)."""
    inv_top = {v: k for k, v in _HF_TOP.items()}
    out = {inv_top[k]: timm_state[k] for k in inv_top}
    for i in range(depth):
        for hf, tm in _HF_BLOCK.items():
            out[f"encoder.layer.{i}.{hf}"] = timm_state[f"blocks.{i}.{tm}"]
        for kind in ("weight", "bias"):
            for name, part in zip(_QKV, timm_state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)):
                out[f"encoder.layer.{i}.attention.attention.{name}.{kind}"] = part.clone()
    return out


def hf_to_timm(hf: Mapping[str, torch.Tensor], depth: int) -> Dict[str, torch.Tensor]:
    """Hugging Face ``Dinov2Model`` names -> timm names (the inverse of :func:`timm_to_hf`)."""
    out = {tm: hf[k] for k, tm in _HF_TOP.items()}
    for i in range(depth):
        for name, tm in _HF_BLOCK.items():
            out[f"blocks.{i}.{tm}"] = hf[f"encoder.layer.{i}.{name}"]
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [hf[f"encoder.layer.{i}.attention.attention.{n}.{kind}"] for n in _QKV], dim=0)
    return out


def read_dinov2_student(path: str, backbone: Backbone, state: Dict[str, torch.Tensor]) -> StudentWeights:
    """The authors' DINOv2 student (``RegDINOv2Base.state_dict()``) -> timm names."""
    own = dict(backbone.model.state_dict())
    depth = len(backbone.model.blocks)
    try:
        expected_hf = set(timm_to_hf(own, depth))
    except KeyError as e:  # a timm ViT whose blocks are not DINOv2's (SwiGLU MLP, no layer scale, ...)
        raise ConfigError(f"method 'phreg' on backbone {backbone.spec.id!r}: no Hugging Face Dinov2Model "
                          f"equivalent of timm key {e}") from e
    primary: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, torch.Tensor] = {}
    unexpected: List[str] = []
    for k, v in state.items():
        if k == "registers":
            continue
        if k.startswith("model."):
            primary[k[len("model."):]] = v
            continue
        for alias, hf_prefix in _HF_ALIASES:
            if k.startswith(alias):
                aliases[hf_prefix + k[len(alias):]] = v
                break
        else:
            unexpected.append(k)
    hf = primary or aliases
    allowed = expected_hf | {_HF_MASK_TOKEN}
    unexpected += sorted(f"model.{k}" for k in set(primary) - allowed)
    unexpected += sorted(k for k in set(aliases) - allowed)
    missing = sorted(f"model.{k}" for k in expected_hf - set(hf)) + ([] if "registers" in state else ["registers"])
    if missing or unexpected:
        raise _key_error(path, backbone, "DINOv2 student, Hugging Face Dinov2Model layout", missing, unexpected)
    for k, v in aliases.items():
        if primary and k in primary and not torch.equal(primary[k], v):
            raise WeightsError(f"--method-weights {path}: model.{k} and its duplicate differ; RegDINOv2Base saves "
                               f"one tensor under both names, so this file was edited")
    vision = {k: v.float() for k, v in hf_to_timm(hf, depth).items()}
    if set(vision) != set(own):
        raise ConfigError(f"method 'phreg' on backbone {backbone.spec.id!r}: timm keys "
                          f"{sorted(set(own) ^ set(vision))[:4]} have no Hugging Face Dinov2Model equivalent")
    inv = {tm: f"model.{k}" for k, tm in _HF_TOP.items()}
    _check_shapes(path, backbone, vision, own, "pos_embed", inv)
    width = int(own["cls_token"].shape[-1])
    vision["pos_embed"] = vision["pos_embed"].reshape(1, -1, width)
    return StudentWeights("timm", LAYOUT_HF, vision, _registers(path, state["registers"], width, "registers"))


def read_student_file(path: str, backbone: Backbone) -> StudentWeights:
    """Parse and check a student file against ``backbone``; raise one :class:`WeightsError` naming the file."""
    family = student_family(backbone)
    state = _load_tensors(path)
    return (read_clip_student if family == "open_clip" else read_dinov2_student)(path, backbone, state)


def initial_student(backbone: Backbone, grid: int, generator: torch.Generator,
                    num_registers: int = NUM_REGISTERS) -> StudentWeights:
    """The untrained student of ``harness distill phreg``: the backbone's weights and random registers.

    Registers are ``randn(R, D) / sqrt(D)`` (``StudentCLIP.__init__``; ``RegDINOv2Base.__init__``). The CLIP
    student's positional embedding is interpolated to the training grid once, with ``StudentCLIP``'s rule
    (+0.1 offset), as its ``__init__`` does for 448 px; the DINOv2 student keeps the backbone's grid (37 x 37
    for 518 px) and interpolates on the fly, as ``RegDINOv2Base`` does through Hugging Face's embeddings.
    """
    family = student_family(backbone)
    width = backbone.width
    regs = torch.randn(num_registers, width, generator=generator) / math.sqrt(width)
    if family == "open_clip":
        vision = {k: v.detach().float().clone() for k, v in backbone.visual.state_dict().items()}
        pos = vision["positional_embedding"]
        vision["positional_embedding"] = torch.cat([pos[:1], interpolate_patch_pos_embed(pos[1:], (grid, grid))])
        return StudentWeights(family, LAYOUT_VIT, vision, regs)
    vision = {k: v.detach().float().clone() for k, v in backbone.model.state_dict().items()}
    return StudentWeights(family, LAYOUT_HF, vision, regs)


# -- the student's vision stages --------------------------------------------------------------------------
class PHRegStudent(EmbedOverride):
    """A backbone's vision stages with a PH-Reg student's weights, registers and positional embedding.

    Runs on a deep copy of the backbone's vision adapter (``base``); only :meth:`embed` differs (the
    positional embedding is interpolated by the file's rule). Blocks, norms and projection are the base's.
    """

    def __init__(self, base: Backbone, registers: torch.Tensor, pos_interpolation: str, layout: str) -> None:
        super().__init__(base)
        self.registers = nn.Parameter(registers.clone())
        self.pos_interpolation = pos_interpolation
        self.layout = layout

    @property
    def num_registers(self) -> int:
        return int(self.registers.shape[0])

    def trainable(self) -> Dict[str, nn.Parameter]:
        """The parameters distillation unlocks (the authors' distill_main.py / clip_reg.py), by name."""
        raise NotImplementedError

    def authors_state_dict(self) -> Dict[str, torch.Tensor]:
        """The student in the authors' layout (what ``--method-weights`` reads back)."""
        raise NotImplementedError


def _loaded_copy(tower: nn.Module, pos_name: str, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``tower`` holding the student's weights; its positional embedding takes the student's shape
    first (stored on the training grid, not the backbone's)."""
    tower = copy.deepcopy(tower)
    setattr(tower, pos_name, nn.Parameter(state[pos_name].clone()))
    tower.load_state_dict(state, strict=True)
    return tower


class CLIPStudent(PHRegStudent):
    """PH-Reg CLIP student on an open_clip tower: ``[CLS, patches, reg]``, MaskCLIP value path last."""

    @classmethod
    def build(cls, backbone: Backbone, w: StudentWeights, pos_interpolation: str) -> "CLIPStudent":
        visual = _loaded_copy(backbone.visual, "positional_embedding", w.vision)
        base = backbone.with_visual(visual)
        return cls(base, w.registers, pos_interpolation, w.layout)

    @property
    def visual(self) -> nn.Module:
        return self.base.visual

    def embed(self, images: torch.Tensor) -> Tokens:
        """conv1 patches, CLS, the stored positional embedding interpolated to the grid (before ``ln_pre``)."""
        v = self.visual
        x = v.conv1(images)
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)
        cls_tok = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls_tok, x], dim=1)
        pos = v.positional_embedding
        pos = torch.cat([pos[:1], _interpolate(self.pos_interpolation, pos[1:], grid)], dim=0)
        return Tokens(x + pos.to(x.dtype), TokenLayout.standard(grid, has_cls=True))

    def trainable(self) -> Dict[str, nn.Parameter]:
        """Registers, positional embedding, ``conv1`` and the last two blocks: ``student_model_initialization``
        (models/OpenaiMaskCLIP/clip_reg.py @ 1a6f9b8) unlocks ``resblocks[-2]`` and ``resblocks[-1]``."""
        v = self.visual
        out: Dict[str, nn.Parameter] = {"register_tokens": self.registers,
                                        "positional_embedding": v.positional_embedding}
        out.update({f"conv1.{k}": p for k, p in v.conv1.named_parameters()})
        n = self.num_blocks
        for i in (n - 2, n - 1):
            out.update({f"transformer.resblocks.{i}.{k}": p
                        for k, p in v.transformer.resblocks[i].named_parameters()})
        return out

    def authors_state_dict(self, layout: str = LAYOUT_VIT) -> Dict[str, torch.Tensor]:
        prefix = {LAYOUT_VIT: "vit.", LAYOUT_ORIGINAL: "original_image_encoder."}[layout]
        out = {prefix + k: t.detach().float().clone() for k, t in self.visual.state_dict().items()}
        if layout == LAYOUT_VIT:  # StudentCLIP keeps the re-gridded embedding as (1, 1 + M², D)
            out["vit.positional_embedding"] = out["vit.positional_embedding"].unsqueeze(0)
        out["register_tokens"] = self.registers.detach().float().clone()
        return out


class DINOv2Student(PHRegStudent):
    """PH-Reg DINOv2 student on a timm ViT: ``[reg, CLS, patches]``, every block kept."""

    @classmethod
    def build(cls, backbone: Backbone, w: StudentWeights, pos_interpolation: str) -> "DINOv2Student":
        model = _loaded_copy(backbone.model, "pos_embed", w.vision)
        base = type(backbone)(backbone.spec, model, backbone.weights_id)
        return cls(base, w.registers, pos_interpolation, w.layout)

    @property
    def model(self) -> nn.Module:
        return self.base.model

    def embed(self, images: torch.Tensor) -> Tokens:
        """Patch embedding, CLS and positional embedding as Hugging Face's ``Dinov2Embeddings`` computes them."""
        check_patch_multiple(images, self.spec.patch_size)
        m = self.model
        x = m.patch_embed(images)  # (B, h, w, D) with dynamic_img_size
        b, h, w, d = x.shape
        x = torch.cat([m.cls_token.to(x.dtype).expand(b, -1, -1), x.reshape(b, h * w, d)], dim=1)
        pos = m.pos_embed[0]
        pos = torch.cat([pos[:1], _interpolate(self.pos_interpolation, pos[1:], (h, w))], dim=0)
        return Tokens(x + pos.to(x.dtype), TokenLayout.standard((h, w), has_cls=True))

    def trainable(self) -> Dict[str, nn.Parameter]:
        """Registers, positional embedding, patch projection and the last block (DINOv2_full/distill_main.py)."""
        m = self.model
        out: Dict[str, nn.Parameter] = {"registers": self.registers, "pos_embed": m.pos_embed}
        out.update({f"patch_embed.proj.{k}": p for k, p in m.patch_embed.proj.named_parameters()})
        n = self.num_blocks
        out.update({f"blocks.{n - 1}.{k}": p for k, p in m.blocks[n - 1].named_parameters()})
        return out

    def authors_state_dict(self) -> Dict[str, torch.Tensor]:
        timm_state = {k: t.detach().float().clone() for k, t in self.model.state_dict().items()}
        hf = timm_to_hf(timm_state, self.num_blocks)
        hf[_HF_MASK_TOKEN] = torch.zeros(1, self.width)
        out = {f"model.{k}": t for k, t in hf.items()}
        for alias, hf_prefix in _HF_ALIASES:  # the same tensors again, as RegDINOv2Base.state_dict() has them
            out.update({alias + k[len(hf_prefix):]: t for k, t in hf.items() if k.startswith(hf_prefix)})
        out["registers"] = self.registers.detach().float().clone().unsqueeze(0)
        return out


# -- the method ------------------------------------------------------------------------------------------
@METHODS.register("phreg", aliases=("ph-reg",))
class PHReg(Method):
    """PH-Reg student: the file's vision weights, 16 registers, MaskCLIP last block for CLIP (arXiv:2505.21501)."""

    # One part touches three places: the student's weights (backbone), its registers (tokens) and its last block.
    # TOUCHES is per class and compositions are checked before a backbone is bound, so ``last_block`` is declared
    # for DINOv2 too, where it runs the plain block: phreg+naclip is refused for both families.
    TOUCHES = ("backbone", "tokens", "last_block")
    WEIGHTS = "required"
    WEIGHTS_HELP = ("a PH-Reg student file: the authors' released CLIP student (Google Drive, see "
                    "`harness.methods.phreg`) or one from `harness distill phreg --backbone ID --images DIR "
                    "--out FILE`")
    PARAMS = {"pos_interpolation": "auto"}  # auto: the rule of the authors' code that loads the file's layout
    CONFIG = {"registers": NUM_REGISTERS, "clip": {"position": "after_patches", "last_block": "maskclip value path"},
              "dinov2": {"position": "start", "last_block": "plain"}, "positional_embedding_on_registers": False}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params["pos_interpolation"] not in INTERPOLATIONS:
            raise ConfigError(f"method 'phreg': pos_interpolation must be one of {', '.join(INTERPOLATIONS)} "
                              f"(got {self.params['pos_interpolation']!r})")
        self._weights: Optional[StudentWeights] = None
        self._value_path = MaskCLIP()  # value path, no residual, no FFN: the same rule as --method maskclip

    def bind(self, backbone: Backbone, weights_path: Optional[str]) -> Optional[str]:
        path = self.require_weights(backbone, weights_path)
        self._weights = read_student_file(path, backbone)
        return path

    def init_untrained(self, backbone: Backbone, grid: int, seed: int) -> "PHReg":
        """Bind the untrained student (distillation's start) instead of a file; see :func:`initial_student`."""
        self._weights = initial_student(backbone, grid, torch.Generator().manual_seed(int(seed)))
        return self

    def vision(self, backbone: Backbone) -> Backbone:
        w = self._weights
        if w is None:
            raise WeightsError(f"method 'phreg' on backbone {backbone.spec.id!r} has no student weights bound")
        rule = str(self.params["pos_interpolation"])
        rule = LAYOUT_INTERPOLATION[w.layout] if rule == "auto" else rule
        kind = CLIPStudent if w.family == "open_clip" else DINOv2Student
        self.student = kind.build(backbone, w, rule)
        # what ran, for the records (an instance attribute shadows the class CONFIG)
        self.CONFIG = {"registers": self.student.num_registers, "family": w.family, "layout": w.layout,
                       "position": "after_patches" if w.family == "open_clip" else "start",
                       "last_block": "maskclip value path" if w.family == "open_clip" else "plain",
                       "positional_embedding_on_registers": False, "stored_grid": w.grid,
                       "pos_interpolation": rule}
        self._weights = None  # the student holds the tensors now
        return self.student

    def add_tokens(self, backbone: Backbone, tokens: Tokens) -> Tokens:
        regs = self.student.registers.to(tokens.x.dtype).unsqueeze(0).expand(tokens.x.shape[0], -1, -1)
        where = "after_patches" if isinstance(self.student, CLIPStudent) else "start"
        return tokens.insert(TOKEN_KIND, regs, where)

    def last_block(self, backbone: Backbone, parts: BlockParts, tokens: Tokens) -> torch.Tensor:
        if isinstance(self.student, CLIPStudent):
            return self._value_path.last_block(backbone, parts, tokens)
        return parts.run(tokens.x)  # DINOv2: the plain last block
