"""A tiny CLIP *test* backbone with a planted, known artifact: ``test-planted-clip`` (random init only).

Cleaners (test-time registers, DVT, SCLIP-style last-block methods, ...) are meant to remove the high-norm
outlier tokens of pretrained ViTs. A random tiny ViT has none, so tests of cleaners could only check that
nothing crashes. This module hand-wires the mechanism that real ViTs learn
(Jiang et al., arXiv:2506.08010, "Vision Transformers Don't Need Trained Registers": sparse MLP
"register neurons" that fire on low-information patches and write high-norm tokens that later layers attend
to) into an otherwise random open_clip CLIP, so that a test can check that a cleaner finds and removes a
*known* artifact. Numbers computed with it say nothing about any real model.

The network: open_clip ``CLIP`` with a 4-block vision tower (patch 16, native 224, width 64, 2 heads, GELU)
and a 1-block text tower (width 32, context 77, open_clip's BPE vocabulary) so that zero-shot OVSS runs.
A few fixed orthonormal residual directions (all orthogonal to the all-ones vector, so LayerNorm's
centring leaves them alone) are reserved: ``texture`` (K of them), ``energy``, ``gate`` and ``outlier``.
Every planted piece, and why it exists:

* **clean reserved directions** -- the random weights of blocks ``<= PLANTED_LAYER`` neither read nor
  write the reserved directions, and no random weight anywhere writes ``outlier``. Why: the planted
  circuit then computes exactly what is documented below, and the only source of outlier content is the
  planted neuron (so zeroing it removes every outlier).
* **high-pass patch channels** (``conv1``) -- K zero-mean random 16x16x3 filters write into the
  ``texture`` directions. Why: their response is ~0 on a near-uniform patch (any colour) and large on a
  textured one, which is what "low-information patch" means here.
* **positional gate** (``positional_embedding``) -- every patch position carries ``+GATE`` or ``-GATE``
  along ``gate``: + on a fixed pseudo-random ~22% of the native 14x14 grid, - elsewhere and on CLS.
  Why: artifacts occur only at positions fixed by the embedding, not by the image (a position-fixed
  artifact for DVT tests). The large gate also gives every token a similar norm, so LayerNorm does not
  turn faint noise on a dark patch into "texture". :func:`planted_mask` interpolates the same pattern
  with the adapter's interpolation, so it is right on any grid.
* **energy units** (block 0 MLP, units ``ENERGY_UNITS``) -- pairs ``gelu(s t_k - d) + gelu(-s t_k - d)``
  (~``|s t_k| - d`` above a dead zone ``d``; their resting output is cancelled by the ``c_proj`` bias) write
  the texture energy of each token along ``energy``. Why: the register neuron needs a non-negative measure
  of information content, which one linear read of ``texture`` cannot give; the dead zone makes faint
  noise on a flat patch read as ~0.
* **the register neuron** (block ``PLANTED_LAYER`` MLP, unit ``PLANTED_UNIT``) -- pre-activation
  ``A * (gate/GATE_LN - energy/TAU - NEURON_MARGIN)`` on the ``ln_2``-normalised token: ~30-45 on a
  near-uniform patch at a gated position, strongly negative elsewhere. Its ``c_proj`` column writes
  ``OUTLIER_GAIN`` along ``outlier``, so those tokens' residual norm becomes ~45x the median (>= 20x on
  every test image at 224 px) -- the register-neuron mechanism of Jiang et al. that TTR searches for (it
  ranks first by mean |activation| on the outlier tokens). ``A`` is large so that few tokens sit in the
  linear ramp or in GELU's negative lobe (which would write a small *negative* outlier component); on
  non-native grids, positions whose interpolated gate is barely positive still fire weakly, so there
  ~5-10% of the final-feature outliers are milder (1-10x the median after the plant).
* **attention sinks** (blocks after ``PLANTED_LAYER``) -- every query gets a bias along a per-head
  direction ``q_h`` and keys read ``outlier`` into ``q_h``. Why: in real ViTs later layers dump
  attention on the outlier tokens; cleaners of the last block (SCLIP, ClearCLIP, NACLIP) exist because of it.
* **amplifying projection** (``visual.proj``) -- ``proj`` maps ``outlier`` to a long output vector. Why:
  after ``ln_post`` every token has the same norm; the amplification keeps the artifact visible in the
  final dense features (norm > 3x the median), as it is in real CLIP features.

API for tests: :data:`PLANTED_LAYER`, :data:`PLANTED_UNIT`, :func:`planted_mask`,
:func:`low_information_images`, :func:`patch_std`, :func:`tower_forward` (a reference forward that
does not depend on the harness adapter API), :func:`build_planted_clip` (the bare open_clip model) and
:func:`planted_backbone_class` (the adapter class; the registry entry is :class:`PlantedCLIPFamily`).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import WeightsError
from ..registry import BACKBONE_FAMILIES, BACKBONES
from .base import BackboneSpec
from .pos_embed import interpolate_patch_pos_embed

#: 0-based index of the block whose MLP holds the register neuron
PLANTED_LAYER = 1
#: hidden unit (of 256) of that MLP that is the register neuron
PLANTED_UNIT = 173

# open_clip.constants.OPENAI_DATASET_MEAN / _STD, as clip.py (not imported from there: see planted_backbone_class)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH = 16
NATIVE = 224
NATIVE_GRID = NATIVE // PATCH  # 14
WIDTH = 64
DEPTH = 4
HEADS = 2
MLP_WIDTH = 4 * WIDTH
EMBED_DIM = 32
TEXT_WIDTH = 32
TEXT_HEADS = 2
TEXT_LAYERS = 1
SEED = 0  # torch seed for the random part; the plant uses its own generator (SEED + 1)

MASK_SHARE = 0.22  # share of native grid positions that are artifact-eligible
N_TEXTURE = 8  # high-pass conv channels
ENERGY_UNITS = tuple(range(MLP_WIDTH - 2 * N_TEXTURE, MLP_WIDTH))  # block-0 units computing |texture|

# plant strengths (residual-stream units; the random tokens have norm ~sqrt(WIDTH) = 8 after ln_pre)
TEXTURE_GAIN = 6.0  # conv1 gain of the high-pass filters
GATE = 8.0  # +-GATE along `gate` in the positional embedding
ENERGY_SLOPE = 4.0  # block-0 energy units: gelu(+-ENERGY_SLOPE * t_k)
ENERGY_DEADZONE = 2.0  # and bias -ENERGY_DEADZONE, so faint noise on a uniform patch reads as ~0 energy
ENERGY_GAIN = 0.15  # their c_proj weight along `energy`
GATE_LN = 6.0  # typical post-ln_2 gate component of a uniform token at block PLANTED_LAYER
TAU = 0.7  # post-ln_2 energy at which the register neuron switches off
NEURON_MARGIN = 0.25  # the gate must be clearly positive: no firing where the interpolated gate is ~0
NEURON_GAIN = 40.0  # A: steep, so few tokens sit in the ramp or in GELU's negative lobe (which writes -outlier)
OUTLIER_GAIN = 10.0  # c_proj weight along `outlier`: outlier residual norm ~ A * OUTLIER_GAIN
SINK_QUERY = 4.0  # query bias along q_h (with SINK_KEY: logit gap ~14, so sinks take ~all attention, as in real ViTs)
SINK_KEY = 2.5  # key weight outlier -> q_h
PROJ_GAIN = 5.0  # visual.proj weight along `outlier`


# -- the fixed patterns ------------------------------------------------------------------------------
def _generator(offset: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


def _directions() -> Dict[str, torch.Tensor]:
    """Reserved orthonormal residual directions, all orthogonal to the all-ones vector (LayerNorm-proof)."""
    names = [f"texture{k}" for k in range(N_TEXTURE)] + ["energy", "gate", "outlier"]
    m = torch.randn(WIDTH, 1 + len(names), generator=_generator(1), dtype=torch.float64)
    m[:, 0] = 1.0
    q, _ = torch.linalg.qr(m)
    return {n: q[:, 1 + i].float() for i, n in enumerate(names)}


def _gate_pattern() -> torch.Tensor:
    """(14, 14) float: +1 at the artifact-eligible native positions, -1 elsewhere (fixed pseudo-random)."""
    n = NATIVE_GRID * NATIVE_GRID
    on = torch.randperm(n, generator=_generator(2))[:round(MASK_SHARE * n)]
    pat = -torch.ones(n)
    pat[on] = 1.0
    return pat.view(NATIVE_GRID, NATIVE_GRID)


def planted_mask(grid_hw: Tuple[int, int]) -> torch.Tensor:
    """Bool (h, w): positions whose (interpolated) positional gate is positive, i.e. where the neuron may fire.

    Uses the adapter's own :func:`interpolate_patch_pos_embed`, which is linear, so this is exactly the sign of
    the gate component of the positional embedding the model adds on that grid.
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    gate = interpolate_patch_pos_embed(_gate_pattern().reshape(-1, 1), (h, w))
    return (gate.view(h, w) > 0)


def _filters() -> torch.Tensor:
    """(K, 3, 16, 16) unit-norm high-pass filters: zero mean per colour channel, so blind to flat colour."""
    f = torch.randn(N_TEXTURE, 3, PATCH, PATCH, generator=_generator(3))
    f = f - f.mean(dim=(-2, -1), keepdim=True)
    return f / f.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


# -- images for tests -----------------------------------------------------------------------------
def low_information_images(n: int, size: Tuple[int, int] = (NATIVE, NATIVE), seed: int = 0) -> torch.Tensor:
    """(n, 3, H, W) CLIP-normalised images: large near-uniform areas plus a few textured objects.

    The background is two flat colours split at a random horizon, with a faint gradient and faint noise
    (real "low-information" patches are not exactly constant); 1-3 rectangles are filled with stripes or
    pixel noise. Deterministic in ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    H, W = int(size[0]), int(size[1])
    out = torch.empty(n, 3, H, W)
    yy = torch.linspace(0, 1, H).view(H, 1)
    xx = torch.linspace(0, 1, W).view(1, W)
    for i in range(n):
        top, bottom = torch.rand(3, generator=g), torch.rand(3, generator=g)
        horizon = int(H * (0.3 + 0.4 * float(torch.rand(1, generator=g))))
        img = torch.where(torch.arange(H).view(1, H, 1) < horizon, top.view(3, 1, 1), bottom.view(3, 1, 1))
        img = img + 0.05 * (yy + xx - 1.0) + 0.01 * torch.randn(3, H, W, generator=g)
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            oh = int(torch.randint(H // 6, H // 3, (1,), generator=g))
            ow = int(torch.randint(W // 6, W // 3, (1,), generator=g))
            y0 = int(torch.randint(0, H - oh, (1,), generator=g))
            x0 = int(torch.randint(0, W - ow, (1,), generator=g))
            c1, c2 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
            if float(torch.rand(1, generator=g)) < 0.5:  # stripes, period 4-8 px
                period = int(torch.randint(4, 9, (1,), generator=g))
                ang = float(torch.rand(1, generator=g)) * math.pi
                ys = torch.arange(oh).view(oh, 1).float()
                xs = torch.arange(ow).view(1, ow).float()
                s = (torch.sin(2 * math.pi * (xs * math.cos(ang) + ys * math.sin(ang)) / period) > 0).float()
                tex = c1 * s + c2 * (1 - s)
            else:  # pixel noise around a colour
                tex = (c1 + 0.35 * torch.randn(3, oh, ow, generator=g))
            img[:, y0:y0 + oh, x0:x0 + ow] = tex
        out[i] = img.clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (out - mean) / std


def patch_std(images: torch.Tensor, patch_size: int = PATCH) -> torch.Tensor:
    """(n, h, w): the largest per-channel pixel std inside each patch -- ~0.04 on near-uniform patches."""
    n, c, H, W = images.shape
    h, w = H // patch_size, W // patch_size
    p = images[:, :, :h * patch_size, :w * patch_size].reshape(n, c, h, patch_size, w, patch_size)
    return p.std(dim=(3, 5)).amax(dim=1)


# -- the model ---------------------------------------------------------------------------------------
def _proj_out(dirs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(D, D) projector onto the orthogonal complement of ``dirs`` (orthonormal)."""
    d = torch.stack(list(dirs), dim=1)
    return torch.eye(WIDTH) - d @ d.T


def _random_clip() -> nn.Module:
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH, image_size=NATIVE)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=TEXT_WIDTH, heads=TEXT_HEADS, layers=TEXT_LAYERS)
    return open_clip.model.CLIP(EMBED_DIM, vision, text, quick_gelu=False)


@torch.no_grad()
def _plant(model: nn.Module) -> None:
    """Wire the circuit of the module docstring into the random vision tower (in place)."""
    v = model.visual
    dirs = _directions()
    tex = [dirs[f"texture{k}"] for k in range(N_TEXTURE)]
    e, gate, u = dirs["energy"], dirs["gate"], dirs["outlier"]
    p_r = _proj_out(list(dirs.values()))  # the random subspace
    p_u = _proj_out([u])
    blocks = v.transformer.resblocks

    # patch embedding: random part kept off the reserved directions, plus the high-pass channels
    w = v.conv1.weight  # (D, 3, p, p)
    w.copy_((p_r @ w.flatten(1)).view_as(w))
    w += TEXTURE_GAIN * torch.einsum("dk,kchw->dchw", torch.stack(tex, dim=1), _filters())
    v.class_embedding.copy_(p_r @ v.class_embedding)
    pos = v.positional_embedding  # (1 + 196, D)
    pos.copy_(pos @ p_r)
    gate_values = torch.cat([torch.tensor([-1.0]), _gate_pattern().reshape(-1)])  # CLS never fires
    pos += GATE * gate_values.view(-1, 1) * gate.view(1, -1)

    # early blocks: random weights read and write only the random subspace
    for blk in blocks[:PLANTED_LAYER + 1]:
        blk.attn.in_proj_weight.copy_(blk.attn.in_proj_weight @ p_r)
        blk.attn.out_proj.weight.copy_(p_r @ blk.attn.out_proj.weight)
        blk.attn.out_proj.bias.copy_(p_r @ blk.attn.out_proj.bias)
        blk.mlp.c_fc.weight.copy_(blk.mlp.c_fc.weight @ p_r)
        blk.mlp.c_proj.weight.copy_(p_r @ blk.mlp.c_proj.weight)
        blk.mlp.c_proj.bias.copy_(p_r @ blk.mlp.c_proj.bias)
    # later blocks read everything but never write `outlier`
    for blk in blocks[PLANTED_LAYER + 1:]:
        blk.attn.out_proj.weight.copy_(p_u @ blk.attn.out_proj.weight)
        blk.attn.out_proj.bias.copy_(p_u @ blk.attn.out_proj.bias)
        blk.mlp.c_proj.weight.copy_(p_u @ blk.mlp.c_proj.weight)
        blk.mlp.c_proj.bias.copy_(p_u @ blk.mlp.c_proj.bias)

    # block 0: texture energy ~ sum_k |s t_k| - d via gelu(s t - d) + gelu(-s t - d), written along `energy`
    fc, cp = blocks[0].mlp.c_fc, blocks[0].mlp.c_proj
    for k in range(N_TEXTURE):
        for j, sign in zip(ENERGY_UNITS[2 * k:2 * k + 2], (1.0, -1.0)):
            fc.weight[j] = sign * ENERGY_SLOPE * tex[k]
            fc.bias[j] = -ENERGY_DEADZONE
            cp.weight[:, j] = ENERGY_GAIN * e
    # cancel the units' resting output 2K * gelu(-deadzone) (< 0), so a flat patch has energy ~0, not < 0
    rest = 2 * N_TEXTURE * ENERGY_GAIN * float(nn.functional.gelu(torch.tensor(-ENERGY_DEADZONE)))
    cp.bias -= rest * e

    # the register neuron: fires on low energy at gated positions, writes `outlier`
    fc, cp = blocks[PLANTED_LAYER].mlp.c_fc, blocks[PLANTED_LAYER].mlp.c_proj
    fc.weight[PLANTED_UNIT] = NEURON_GAIN * (gate / GATE_LN - e / TAU)
    fc.bias[PLANTED_UNIT] = -NEURON_GAIN * NEURON_MARGIN
    cp.weight[:, PLANTED_UNIT] = OUTLIER_GAIN * u

    # attention sinks after the plant: every query has a q_h component, outlier keys are long along q_h
    hd = WIDTH // HEADS
    qdirs = torch.randn(DEPTH, HEADS, hd, generator=_generator(4))
    qdirs = qdirs / qdirs.norm(dim=-1, keepdim=True)
    for li in range(PLANTED_LAYER + 1, DEPTH):
        attn = blocks[li].attn
        for h in range(HEADS):
            qh = qdirs[li, h]
            attn.in_proj_bias[h * hd:(h + 1) * hd] = SINK_QUERY * qh
            attn.in_proj_weight[WIDTH + h * hd:WIDTH + (h + 1) * hd] += SINK_KEY * torch.outer(qh, u)

    # final projection: keep the outlier visible after ln_post
    out_dir = torch.randn(EMBED_DIM, generator=_generator(5))
    v.proj.copy_(p_u @ v.proj + PROJ_GAIN * torch.outer(u, out_dir / out_dir.norm()))


def build_planted_clip() -> nn.Module:
    """The planted open_clip ``CLIP``, identical on every call; the caller's RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = _random_clip()
    _plant(model)
    return model.eval()


def tower_forward(visual: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Reference forward of an open_clip vision tower on any patch grid: final tokens (B, 1 + h*w, E), (h, w).

    Runs ``conv1``, the interpolated positional embedding, ``ln_pre``, each ``resblocks[i]`` as a module call
    (so forward hooks fire), ``ln_post`` and ``proj``. Independent of the harness adapter API on purpose.
    """
    t = visual.conv1(x)
    grid = (int(t.shape[-2]), int(t.shape[-1]))
    t = t.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(t.shape[0], -1, -1).to(t.dtype)
    t = torch.cat([cls, t], dim=1)
    pos = visual.positional_embedding
    t = visual.ln_pre(t + torch.cat([pos[:1], interpolate_patch_pos_embed(pos[1:], grid)]).to(t.dtype))
    for blk in visual.transformer.resblocks:
        t = blk(t)
    return visual.ln_post(t) @ visual.proj, grid


# -- harness registration -------------------------------------------------------------------------
_ADAPTER: Optional[type] = None


def planted_backbone_class() -> type:
    """``PlantedCLIPBackbone``: the :class:`OpenCLIPBackbone` subclass for the planted model (created once).

    Why lazily: the registry imports this module while ``clip.py`` is still executing (its
    ``@BACKBONE_FAMILIES.register`` decorator triggers module discovery before ``OpenCLIPBackbone`` is bound),
    so the base class cannot be imported at module level.
    """
    global _ADAPTER
    if _ADAPTER is None:
        from .clip import OpenCLIPBackbone

        class PlantedCLIPBackbone(OpenCLIPBackbone):
            """The open_clip adapter over the planted test CLIP (random init only)."""

            @classmethod
            def build(cls, spec: BackboneSpec, weights_path: Optional[str]) -> "PlantedCLIPBackbone":
                if weights_path is not None:
                    raise WeightsError(f"backbone {spec.id!r} is a planted test model: random init only, no "
                                       f"weights file ({weights_path})")
                return cls(spec, build_planted_clip(), "random-init")

            def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
                """open_clip's standard BPE tokenizer (the arch is no open_clip model name, so no lookup)."""
                from open_clip.tokenizer import SimpleTokenizer

                if self._tokenizer is None:
                    self._tokenizer = SimpleTokenizer(context_length=77)
                return self._tokenizer(list(texts))

        PlantedCLIPBackbone.__module__ = __name__
        _ADAPTER = PlantedCLIPBackbone
    return _ADAPTER


def __getattr__(name: str) -> object:  # PEP 562: `from harness.backbones.planted import PlantedCLIPBackbone`
    if name == "PlantedCLIPBackbone":
        return planted_backbone_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@BACKBONE_FAMILIES.register("planted_clip")
class PlantedCLIPFamily:
    """Backbone family ``planted_clip``: ``build(spec, None)`` returns a ``PlantedCLIPBackbone`` adapter."""

    @staticmethod
    def build(spec: BackboneSpec, weights_path: Optional[str]) -> nn.Module:
        return planted_backbone_class().build(spec, weights_path)


PLANTED_SPEC = BackboneSpec(
    id="test-planted-clip", family="planted_clip", arch="planted-clip-tiny", weights_tag="", patch_size=PATCH,
    mean=CLIP_MEAN, std=CLIP_STD, native_size=NATIVE, has_text=True,
    description=(f"TEST MODEL: tiny CLIP (patch 16, depth {DEPTH}, width {WIDTH}; text depth {TEXT_LAYERS}, width "
                 f"{TEXT_WIDTH}) with a planted register neuron (block {PLANTED_LAYER}, unit {PLANTED_UNIT}) that "
                 "writes high-norm tokens on uniform patches at fixed positions (random init only)"),
)
BACKBONES.add(PLANTED_SPEC.id, PLANTED_SPEC)

__all__: List[str] = ["PLANTED_LAYER", "PLANTED_UNIT", "PLANTED_SPEC", "PlantedCLIPFamily", "build_planted_clip",
                      "low_information_images", "patch_std", "planted_backbone_class", "planted_mask",
                      "tower_forward"]
