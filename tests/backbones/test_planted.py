"""The planted-artifact test backbone ``test-planted-clip``: the artifact is where the module says it is.

Cleaner tests rely on these facts, so they are checked here once: the register neuron writes high-norm
tokens only on near-uniform patches at the planted positions (native and non-square grids), zeroing it
removes them, a register-neuron search ranks it first, later attention sinks onto the outliers, the text
tower works, and building is deterministic without touching the caller's RNG.

Measurements go through :func:`tower_forward` plus forward hooks on ``visual.transformer.resblocks``, not
through the harness adapter API (which may change); one test ties the two together.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
import torch
from torch import nn

from harness.backbones.clip import OpenCLIPBackbone
from harness.backbones.planted import (
    PLANTED_LAYER,
    PLANTED_SPEC,
    PLANTED_UNIT,
    PlantedCLIPFamily,
    build_planted_clip,
    low_information_images,
    patch_std,
    planted_backbone_class,
    planted_mask,
    tower_forward,
)
from harness.errors import WeightsError
from harness.registry import BACKBONE_FAMILIES, BACKBONES

UNIFORM_STD = 0.1  # patch_std below this: near-uniform (background noise is ~0.04)
TEXTURED_STD = 0.3  # patch_std above this: textured


@pytest.fixture(scope="module")
def backbone() -> OpenCLIPBackbone:
    bb = BACKBONE_FAMILIES.get("planted_clip").build(PLANTED_SPEC, None)
    bb.requires_grad_(False)
    return bb.eval()


class Run:
    """One forward of the planted tower with the measurements the tests share."""

    def __init__(self, bb: OpenCLIPBackbone, x: torch.Tensor, zero_unit: bool = False,
                 act_layers: Tuple[int, ...] = ()) -> None:
        blocks = bb.model.visual.transformer.resblocks
        self.acts: Dict[int, torch.Tensor] = {}
        self.block_in: Optional[torch.Tensor] = None
        handles = [blocks[PLANTED_LAYER].register_forward_hook(self._keep_residual),
                   blocks[PLANTED_LAYER + 1].register_forward_pre_hook(self._keep_block_in)]
        if zero_unit:
            handles.append(blocks[PLANTED_LAYER].mlp.gelu.register_forward_hook(_zero_planted_unit))
        for li in act_layers:
            handles.append(blocks[li].mlp.gelu.register_forward_hook(self._keep_act(li)))
        try:
            with torch.no_grad():
                final, grid = tower_forward(bb.model.visual, x)
        finally:
            for h in handles:
                h.remove()
        self.x, self.grid = x, grid
        n = x.shape[0]
        self.res_norm = self.residual[:, 1:].norm(dim=-1)  # (n, h*w) patch tokens after PLANTED_LAYER
        self.res_ratio = self.res_norm / self.res_norm.median()
        fin = final[:, 1:].norm(dim=-1)
        self.final_ratio = fin / fin.median()
        self.outliers = self.final_ratio > 3.0  # (n, h*w)
        std = patch_std(x).reshape(n, -1)
        self.uniform, self.textured = std < UNIFORM_STD, std > TEXTURED_STD
        self.mask = planted_mask(grid).reshape(1, -1).expand(n, -1)

    def _keep_residual(self, mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        self.residual = out

    def _keep_block_in(self, mod: nn.Module, inp: tuple) -> None:
        self.block_in = inp[0]

    def _keep_act(self, li: int):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            self.acts[li] = out
        return hook


def _zero_planted_unit(mod: nn.Module, inp: tuple, out: torch.Tensor) -> torch.Tensor:
    out = out.clone()
    out[:, 1:, PLANTED_UNIT] = 0.0  # patch tokens only, as test-time registers do
    return out


@pytest.fixture(scope="module")
def native(backbone: OpenCLIPBackbone) -> Run:
    return Run(backbone, low_information_images(8, (224, 224), seed=0), act_layers=tuple(range(PLANTED_LAYER + 2)))


@pytest.fixture(scope="module")
def wide(backbone: OpenCLIPBackbone) -> Run:
    return Run(backbone, low_information_images(4, (224, 320), seed=1))


# -- registration ------------------------------------------------------------------------------------
def test_registered_as_test_backbone() -> None:
    spec = BACKBONES.get("test-planted-clip")
    assert spec is PLANTED_SPEC and spec.description.startswith("TEST MODEL") and spec.has_text
    assert BACKBONE_FAMILIES.get(spec.family) is PlantedCLIPFamily


def test_family_builds_an_open_clip_adapter(backbone: OpenCLIPBackbone) -> None:
    assert type(backbone) is planted_backbone_class() and isinstance(backbone, OpenCLIPBackbone)
    assert backbone.weights_id == "random-init" and backbone.spec is PLANTED_SPEC
    with pytest.raises(WeightsError, match="random init only"):
        PlantedCLIPFamily.build(PLANTED_SPEC, "/some/weights.pt")


def test_planted_mask_share_and_grids() -> None:
    m = planted_mask((14, 14))
    assert m.dtype == torch.bool and m.shape == (14, 14)
    assert 0.15 <= m.float().mean() <= 0.3
    wide = planted_mask((14, 20))
    assert wide.shape == (14, 20) and 0.15 <= wide.float().mean() <= 0.3


@pytest.mark.parametrize("grid", [(14, 14), (14, 20), (10, 10), (28, 28)])
def test_planted_mask_is_the_sign_of_the_embedded_gate(backbone: OpenCLIPBackbone, grid: Tuple[int, int]) -> None:
    from harness.backbones.planted import _directions
    from harness.backbones.pos_embed import interpolate_patch_pos_embed

    pos = backbone.model.visual.positional_embedding.detach()
    gate = interpolate_patch_pos_embed(pos[1:], grid) @ _directions()["gate"]
    assert torch.equal(gate.view(grid) > 0, planted_mask(grid))


# -- (1) outliers: where they are -----------------------------------------------------------------
def test_outliers_on_uniform_patches_at_planted_positions(native: Run) -> None:
    o = native.outliers
    share = o.float().mean()
    assert share >= 0.05, share
    assert native.res_ratio[o].min() >= 10.0  # the register neuron's tokens are >= 10x the median after it
    assert (o & native.mask).sum() >= 0.98 * o.sum()  # position-fixed
    assert (o & native.uniform).sum() >= 0.98 * o.sum()  # low-information patches only
    assert not (o & native.textured).any()
    assert (native.res_ratio[native.textured] < 3.0).all()
    # and nearly every uniform patch at a planted position is an outlier
    eligible = native.mask & native.uniform
    assert (o & eligible).sum() >= 0.9 * eligible.sum()


def test_outliers_on_non_square_grid(wide: Run) -> None:
    """224 x 320 (grid 14 x 20): the interpolated gate still decides where, :func:`planted_mask` knows it."""
    assert wide.grid == (14, 20)
    o = wide.outliers
    assert o.float().mean() >= 0.05
    assert (o & wide.mask).sum() >= 0.98 * o.sum()
    assert (o & wide.uniform).sum() >= 0.98 * o.sum()
    assert not (o & wide.textured).any()
    # positions where the interpolated gate is barely positive fire weakly: a few milder outliers (the final
    # ln_post + proj saturate, so a token that is ~1.5x the median after the plant can already pass 3x there)
    assert wide.res_ratio[o].median() >= 10.0
    assert (wide.res_ratio[o] >= 10.0).float().mean() >= 0.85


# -- (2) the neuron is the cause ------------------------------------------------------------------
@pytest.mark.parametrize("which", ["native", "wide"])
def test_zeroing_the_planted_unit_removes_outliers(backbone: OpenCLIPBackbone, which: str,
                                                   request: pytest.FixtureRequest) -> None:
    run: Run = request.getfixturevalue(which)
    assert run.outliers.float().mean() >= 0.05
    ablated = Run(backbone, run.x, zero_unit=True)
    assert ablated.outliers.float().mean() <= 0.01
    assert ablated.res_ratio.max() < 3.0


# -- (3) a register-neuron search finds it ------------------------------------------------------
def test_planted_unit_ranks_first(native: Run) -> None:
    """Mean |activation| over the outlier tokens, all (layer, unit) pairs of layers <= PLANTED_LAYER + 1."""
    o = native.outliers
    scores: List[Tuple[float, int, int]] = []
    for li, act in native.acts.items():
        per_unit = act[:, 1:][o].abs().mean(dim=0)  # (units,)
        scores += [(float(s), li, j) for j, s in enumerate(per_unit)]
    scores.sort(reverse=True)
    assert scores[0][1:] == (PLANTED_LAYER, PLANTED_UNIT)
    assert scores[0][0] >= 3 * scores[1][0]
    # sparse: the neuron is ~0 on most tokens (TTR's optional sparsity filter keeps it)
    assert (native.acts[PLANTED_LAYER][..., PLANTED_UNIT] < 0.5).float().mean() >= 0.5


# -- (4) later layers attend to the outliers -------------------------------------------------------
def test_next_block_attends_to_outliers(backbone: OpenCLIPBackbone, native: Run) -> None:
    blk = backbone.model.visual.transformer.resblocks[PLANTED_LAYER + 1]
    attn: nn.MultiheadAttention = blk.attn
    with torch.no_grad():
        y = blk.ln_1(native.block_in)
        b, n, d = y.shape
        heads = attn.num_heads
        q, k, _ = nn.functional.linear(y, attn.in_proj_weight, attn.in_proj_bias).view(
            b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2) / (d // heads) ** 0.5).softmax(dim=-1)  # (b, heads, queries, keys)
    received = a.mean(dim=2)[..., 1:]  # mean attention each patch key receives, (b, heads, h*w)
    o = native.outliers.unsqueeze(1).expand_as(received)
    per_outlier, per_other = received[o].mean(), received[~o].mean()
    assert per_outlier >= 5 * per_other, (per_outlier, per_other)
    mass = (received * o).sum(dim=-1)  # share of all attention that lands on outliers, per image and head
    assert mass.mean() >= 0.5 > native.outliers.float().mean()


# -- (5) text tower --------------------------------------------------------------------------------
def test_text_tower(backbone: OpenCLIPBackbone) -> None:
    tokens = backbone.tokenize(["a photo of a road.", "sky", "a photo of a small red car parked by a tree."])
    assert tokens.shape == (3, 77) and tokens.dtype == torch.long
    with torch.no_grad():
        emb = backbone.encode_text(tokens)
        full = backbone.model.encode_text(tokens)
    assert emb.shape == (3, backbone.model.visual.proj.shape[1]) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb, full, rtol=1e-5, atol=1e-5)


# -- (6) determinism ---------------------------------------------------------------------------------
def test_build_is_deterministic_and_leaves_rng_alone(backbone: OpenCLIPBackbone) -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    other = build_planted_clip()
    assert torch.equal(torch.get_rng_state(), state)
    ref, new = backbone.model.state_dict(), other.state_dict()
    assert ref.keys() == new.keys()
    assert all(torch.equal(ref[k], new[k]) for k in ref)


def test_harness_forward_matches_reference(backbone: OpenCLIPBackbone) -> None:
    """The harness's dense path sees the same features (and so the same outliers) as :func:`tower_forward`."""
    from harness.models import build_dense_model

    model = build_dense_model("test-planted-clip", "vanilla", random_init=True)
    x = low_information_images(2, (224, 320), seed=3)
    with torch.no_grad():
        feats = model.forward_dense(x)
        ref, grid = tower_forward(backbone.model.visual, x)
    assert feats.grid == grid == (14, 20)
    torch.testing.assert_close(feats.patch, ref[:, 1:].transpose(1, 2).reshape(2, -1, *grid), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats.cls, ref[:, 0], rtol=1e-4, atol=1e-4)
