"""UniRefiner: a LoRA-refined CLIP tower run on the image padded with a ring of filler patches (Qiu, Hu, Ke, Tian,
Wu, Zhang, "Teaching Pre-trained ViTs to Self-Dispose Dross via Contrastive Register", CVPR 2026,
arXiv:2605.19622; code github.com/CongpeiQiu/UniRefiner @ 38f4e71b).

``--method unirefiner --method-weights FILE`` replaces the vision weights by the refined ones (the text tower
stays the backbone's) and pads every input the model gets -- the whole image, or each sliding window -- with
``ring`` patches of filler on every side before the patch embedding, as the authors' trainer does
(``surround_image_with_registers``, ``unirefiner/method/registers.py``). The filler is set in normalised
space: ``zero`` (the mean colour), ``uniform`` U(0, 1) or ``normal`` N(0, 1) (their ``zero``/``rand``/
``randn``). The positional embedding is interpolated to the padded grid with the rule of the authors'
Hugging Face tower (``CLIPVisionEmbeddings.interpolate_pos_encoding`` in transformers: bicubic to an explicit
size, ``align_corners=False``, no +0.1 offset); ``--param pos_interpolation=offset`` uses the harness's
open_clip adapter rule instead, with which ``ring=0`` and unchanged weights reproduce the vanilla backbone
exactly. The ring tokens ("contrastive registers") run through every block as an ``added:unirefiner``
segment after the patches, so dense outputs drop them and last-block methods treat them as any added token
(``unirefiner+naclip`` composes); the usual CLIP finalize (``ln_post``, then the refined ``proj``) follows.
``--param ring=0`` is the no-ring ablation.

Files (``harness.methods.unirefiner_hf``): the merged Hugging Face layout (the authors' ``model_final.pt``)
or a per-epoch ``{"state_dict": ...}`` with PEFT keys (LoRA merged on load). No checkpoints are released
(README @ 38f4e71b: "TBA" for every recipe); train one with ``harness distill unirefiner``.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Tuple

import torch
from torch import nn

from ..backbones.base import CLS, PATCHES, Backbone, EmbedOverride, TokenLayout, Tokens
from ..backbones.pos_embed import interpolate_patch_pos_embed
from ..errors import ConfigError, WeightsError
from ..registry import METHODS
from .base import Method
from .unirefiner_hf import interpolate_pos_hf, read_refined_file

TOKEN_KIND = "added:unirefiner"
#: ring width in patches: ``max(grid // reg_factor, 1)`` with ``reg_factor`` 32 (37 for DINOv2-g) in every recipe
#: (configs/*.yaml and unirefiner/method/unirefiner.py @ 38f4e71b), i.e. 1 patch below a 64-patch grid
RING = 1
REG_FACTOR = 32
#: filler names (ours -> the authors' ``register_type``: zero, rand, randn)
FILLS = {"zero": "zero", "uniform": "rand", "normal": "randn"}
AUTHORS_FILLS = {v: k for k, v in FILLS.items()}
#: positional-embedding interpolation: ``size`` (transformers' CLIP rule, the authors' tower) or ``offset`` (DINO's
#: +0.1 scale factor, the harness's open_clip adapter)
POS_RULES = ("size", "offset")


def interpolate_pos(rule: str, patch_pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(M*M, D) patch positional embeddings -> (h*w, D) by ``rule`` (unchanged on the stored square grid)."""
    return interpolate_pos_hf(patch_pos, grid) if rule == "size" else interpolate_patch_pos_embed(patch_pos, grid)


def ring_size(grid: int, reg_factor: int = REG_FACTOR) -> int:
    """The training ring: ``max(grid // reg_factor, 1)`` patches (``UniRefinerMethod.forward``)."""
    return max(int(grid) // int(reg_factor), 1)


def check_fill(fill: str, what: str = "fill") -> str:
    fill = AUTHORS_FILLS.get(str(fill), str(fill))
    if fill not in FILLS:
        raise ConfigError(f"{what} must be one of {', '.join(FILLS)} (or the authors' rand/randn), got {fill!r}")
    return fill


def pad_ring(images: torch.Tensor, patch: int, ring: int, fill: str,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, 3, H + 2 r p, W + 2 r p) with the filler around them."""
    if ring <= 0:
        return images
    b, c, h, w = images.shape
    pad = ring * patch
    shape = (b, c, h + 2 * pad, w + 2 * pad)
    kw = {"device": images.device, "dtype": images.dtype}
    if fill == "zero":
        canvas = torch.zeros(shape, **kw)
    else:
        draw = torch.rand if fill == "uniform" else torch.randn
        gen_device = generator.device if generator is not None else images.device
        canvas = draw(shape, generator=generator, device=gen_device, dtype=images.dtype).to(images.device)
    canvas[:, :, pad:pad + h, pad:pad + w] = images
    return canvas


def ring_mask(grid: Tuple[int, int], ring: int) -> torch.Tensor:
    """Bool (H * W,) over the padded grid ``grid``: True on the ring, row-major."""
    h, w = int(grid[0]), int(grid[1])
    m = torch.ones(h, w, dtype=torch.bool)
    m[ring:h - ring, ring:w - ring] = False
    return m.reshape(-1)


def split_ring(patch_tokens: torch.Tensor, grid: Tuple[int, int], ring: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, H*W, D) tokens of the padded grid -> (inner (B, h*w, D) row-major, ring (B, R, D))."""
    m = ring_mask(grid, ring).to(patch_tokens.device)
    return patch_tokens[:, ~m], patch_tokens[:, m]


class RingCLIP(EmbedOverride):
    """A copy of an open_clip vision adapter with refined weights whose :meth:`embed` adds the filler ring."""

    def __init__(self, base: Backbone, ring: int, fill: str, seed: int, pos_interpolation: str = "size") -> None:
        super().__init__(base)
        self.ring, self.fill, self.seed = int(ring), fill, int(seed)
        self.pos_interpolation = pos_interpolation

    @property
    def visual(self) -> nn.Module:
        return self.base.visual

    def embed_plain(self, images: torch.Tensor) -> Tokens:
        """conv1 patches, CLS and the positional embedding interpolated by ``pos_interpolation`` (before ``ln_pre``)."""
        if self.pos_interpolation == "offset":
            return self.base.embed(images)
        v = self.visual
        x = v.conv1(images)
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)
        cls_tok = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        pos = v.positional_embedding
        pos = torch.cat([pos[:1], interpolate_pos(self.pos_interpolation, pos[1:], grid)], dim=0)
        return Tokens(torch.cat([cls_tok, x], dim=1) + pos.to(x.dtype), TokenLayout.standard(grid, has_cls=True))

    def embed(self, images: torch.Tensor) -> Tokens:
        """Embedding of the ring-padded input; tokens ``[CLS, patches, ring]`` with the ring as an added segment."""
        if self.ring <= 0:
            return self.embed_plain(images)
        gen = None
        if self.fill != "zero":  # a fixed draw per call: the same window always gets the same filler
            gen = torch.Generator(device=images.device).manual_seed(self.seed)
        tokens = self.embed_plain(pad_ring(images, self.spec.patch_size, self.ring, self.fill, gen))
        lay = tokens.layout
        if [k for k, _ in lay.segments] != [CLS, PATCHES]:
            raise ConfigError(f"method 'unirefiner' expects [CLS, patches] tokens from backbone {self.spec.id!r}, "
                              f"got {lay.segments}")
        grid = (lay.grid[0] - 2 * self.ring, lay.grid[1] - 2 * self.ring)
        if grid[0] < 1 or grid[1] < 1:
            raise ConfigError(f"method 'unirefiner': input grid {lay.grid} is too small for a ring of {self.ring}")
        inner, ring = split_ring(tokens.x[:, lay.patches], lay.grid, self.ring)
        x = torch.cat([tokens.x[:, :1], inner, ring], dim=1)
        layout = TokenLayout(((CLS, 1), (PATCHES, grid[0] * grid[1]), (TOKEN_KIND, ring.shape[1])), grid)
        return Tokens(x, layout)


def refined_copy(backbone: Backbone, state: Optional[dict]) -> Backbone:
    """A copy of ``backbone``'s vision adapter holding ``state`` (open_clip ``visual`` names), text left out."""
    visual = copy.deepcopy(backbone.visual)
    if state is not None:
        visual.load_state_dict(state, strict=True)
    return backbone.with_visual(visual)


@METHODS.register("unirefiner")
class UniRefiner(Method):
    """UniRefiner (arXiv:2605.19622): refined CLIP vision weights, run with a ring of filler patches."""

    TOUCHES = ("backbone",)
    WEIGHTS = "required"
    WEIGHTS_HELP = ("a UniRefiner CLIP vision file in the authors' Hugging Face layout (merged model_final.pt or a "
                    "per-epoch epoch_K.pt with PEFT keys), e.g. from `harness distill unirefiner --backbone ID "
                    "--images DIR --out FILE`; no official checkpoints are released")
    PARAMS = {"ring": RING, "fill": "zero", "seed": 0, "pos_interpolation": "size"}
    CONFIG = {"ring_position": "after_patches", "ring_in_dense_output": False, "pos_embed": "interpolated to the "
              "padded grid"}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        try:
            ring = int(self.params["ring"])
        except (TypeError, ValueError):
            ring = -1
        if ring < 0:
            raise ConfigError(f"method 'unirefiner': ring must be an integer >= 0 (got {self.params['ring']!r})")
        self.params["ring"] = ring
        self.params["fill"] = check_fill(self.params["fill"], "method 'unirefiner': fill")
        if self.params["pos_interpolation"] not in POS_RULES:
            raise ConfigError(f"method 'unirefiner': pos_interpolation must be one of {', '.join(POS_RULES)} "
                              f"(got {self.params['pos_interpolation']!r})")
        self._state: Optional[dict] = None
        self.refined: Optional[RingCLIP] = None

    def bind(self, backbone: Backbone, weights_path: Optional[str]) -> Optional[str]:
        path = self.require_weights(backbone, weights_path)
        if not hasattr(backbone, "visual") or not hasattr(backbone.visual, "transformer"):
            raise ConfigError(f"method 'unirefiner' loads CLIP vision towers (open_clip backbones such as "
                              f"clip-b16-openai), not {backbone.spec.id!r}")
        self._state, kind = read_refined_file(path, backbone.visual, backbone.spec.id)
        self.CONFIG = {**type(self).CONFIG, "file_layout": kind}
        return path

    def init_from(self, backbone: Backbone, state: Optional[dict] = None) -> "UniRefiner":
        """Bind tensors directly (open_clip names; None: the backbone's own), e.g. a trainer's current model."""
        self._state = state if state is not None else {k: v.detach().clone()
                                                        for k, v in backbone.visual.state_dict().items()}
        return self

    def vision(self, backbone: Backbone) -> Backbone:
        if self._state is None:
            raise WeightsError(f"method 'unirefiner' on backbone {backbone.spec.id!r} has no refined weights bound")
        base = refined_copy(backbone, self._state)
        self._state = None  # the copy holds the tensors now
        self.refined = RingCLIP(base, self.params["ring"], self.params["fill"], int(self.params["seed"]),
                                str(self.params["pos_interpolation"]))
        return self.refined
