"""``harness distill dvt``: DVT's two training stages in plain PyTorch (Yang et al., "Denoising Vision
Transformers", ECCV 2024, arXiv:2401.02957, §3.2-§3.3; github.com/Jiawei-Yang/Denoising-ViT @ 82704df).

**Stage 1** (``--stage 1``; their ``main_img_denoising.py``) decomposes the final-normed patch features of
random crops of each image as ``ViT(view) = F(global coords) + G(view coords) + sg(h(ViT(view)))``:

* ``F``, the image's *semantic field*: a function of the position in the full image, shared by all views of
  that image, so anything that moves with the crop cannot live in it;
* ``G``, the *shared artifact*: a (C, h, w) map indexed by the position in the view, independent of the
  image. DVT learns it per image; here one ``G`` is shared by **all images of the run** (the artifact is
  input-independent by DVT's own model, so every image is evidence for it): the images are fitted in
  batches of ``--batch-size`` (default 1, as DVT) and ``G`` carries over from batch to batch;
* ``h``, the *residual*: a small MLP on the raw feature for the image-and-position-dependent part (high-norm
  tokens that fire only on some content), switched on for the second half of each batch's steps while
  ``G`` is frozen (their ``freeze_shared_artifacts_after=0.5``).

The loss is theirs (``offline_denoiser.py``): ``MSE + (1 - cos)`` of the prediction against the raw
features, plus ``0.1 * MSE(h, sg(raw - F - G)) + 0.02 * mean|h|`` once ``h`` is on; each step samples 2048
random (view, patch) features per image. Views: ``--views`` (768) ``RandomResizedCrop(scale 0.1-0.5,
ratio 3/4-4/3)`` crops with a random horizontal flip, resized back to ``--resolution``, plus the full image.

*Neural field, our choice.* DVT's ``F`` is a tiny-cuda-nn hash grid (16 levels x 8 features, resolutions
16 -> 1024) and an MLP ``128 -> C/2 -> C``. Here the encoding is the same multi-resolution grid **without
hashing** (dense ``grid_sample`` grids, plain PyTorch), 16 levels x 8 features from 16 up to
``4 x`` the patch grid: the finest crop DVT draws covers ``sqrt(0.1 * 3/4) ~ 0.27`` of the image side, so its
patch grid samples the image at most ``~3.7 x`` denser than the full-image grid and finer cells are never
seen. At that size the grids are dense enough to need no hash (no collisions) and small (~0.7 M values per
image at 37 x 37). The MLP is theirs.

Written to ``OUT.stage1/``: ``features/NNNNNN.pt`` per image (``raw`` and ``denoised``: (C, h, w) final-normed
features of the full image and ``F`` evaluated on its grid -- what DVT stores as ``raw_features`` and
``denoised_features``), and ``stage1.pt`` (``artifact``: the learned shared ``G``, (C, h, w); the image list
and settings). **Stage 2** (``--stage 2``; their ``main_denoiser.py``) trains the generalizable denoiser (one
block + positional embedding, :class:`harness.methods.dvt.DenoiserNet`) from ``raw`` to ``denoised`` and
writes ``OUT`` in the authors' format: it loads with ``--method dvt --method-weights OUT``. ``--stage all``
(default) runs both; each stage resumes from its checkpoint and skips itself when its output is current.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import BackboneSpec
from ..errors import ConfigError, DataError, WeightsError
from ..image_folder import list_images, read_image
from ..methods.base import DenseModel
from ..methods.dvt import DenoiserNet, default_heads
from ..runtime import Dist
from .common import DistillLoop, atomic_save, cycle_batches, files_fingerprint, fingerprint, rank_slices

# -- stage 1 recipe: Denoising-ViT @ 82704df, main_img_denoising.py get_args() unless noted -----------------
S1_VIEWS = 768  # --num_views
S1_STEPS = 25_000  # --num_iters
S1_WARMUP_FRAC = 2_500 / 25_000  # --warmup_iters 2500 of 25000, kept as a fraction for other step counts
S1_LR, S1_MIN_LR, S1_WEIGHT_DECAY = 0.01, 0.001, 1e-5  # --lr, --min_lr, --weight_decay
S1_BETAS, S1_EPS = (0.9, 0.99), 1e-15  # torch.optim.Adam(..., eps=1e-15, betas=(0.9, 0.99)) in denoise_an_image
S1_SAMPLES = 2_048  # --pixel_bsz: (view, patch) features per step and image
S1_FREEZE_AFTER = 0.5  # --freeze_shared_artifacts_after
S1_EXTRACT_BATCH = 32  # --extract_bsz
S1_CROP_SCALE, S1_CROP_RATIO = (0.1, 0.5), (3 / 4, 4 / 3)  # RandomResizedCropFlip(scale=(0.1, 0.5)), torchvision ratio
S1_FLIP_PROB = 0.5  # dvt/dataset/transform.py: np.random.random() < 0.5
S1_RESIDUAL_WEIGHT, S1_SPARSITY_WEIGHT = 0.1, 0.02  # dvt/models/offline_denoiser.py loss terms
S1_ARTIFACT_INIT_STD = 0.02  # offline_denoiser.py: shared_artifacts = randn(...) * 0.02
FIELD_LEVELS, FIELD_FEATURES, FIELD_BASE = 16, 8, 16  # --n_levels 16; neural_feature_field.py: 8 per level, base 16
FIELD_INIT = 1e-4  # tiny-cuda-nn grid init U(-1e-4, 1e-4) (NVlabs/tiny-cuda-nn @ 2ec562e, encodings/grid.h)
FIELD_MAX_FACTOR = 4  # ours: finest level = 4 x the patch grid (see the module docstring)
#: DVT's input side: 518 for patch 14, 512 for patch 16 (main_denoiser.py: 518 -> 512 for stride 16)
DVT_INPUT = 518

# -- stage 2 recipe: Denoising-ViT @ 82704df, main_denoiser.py get_args() / sample_scripts/stage2.sh -----------
S2_STEPS = 50_000  # stage2.sh --num_iterations 50000
S2_BATCH = 16  # stage2.sh --batch_size 16 (per GPU)
S2_BLR, S2_MIN_LR, S2_WEIGHT_DECAY = 2e-4, 1e-6, 1e-5  # --blr (lr = blr * sqrt(bs / 256)), --min_lr, --weight_decay
S2_WARMUP_FRAC = 0.15  # CosineScheduler(warmup_iters=int(num_iterations * 0.15), start_warmup_value=0)
S2_BETAS = (0.9, 0.999)  # torch.optim.AdamW(betas=(0.9, 0.999))

STAGE1_FILE = "stage1.pt"
FEATURES_DIR = "features"


def default_resolution(patch: int) -> int:
    """DVT's training input for a patch size: the largest multiple of the patch not above 518 (518 / 512)."""
    return DVT_INPUT // patch * patch


def stage1_dir(out: str) -> str:
    """Where stage 1 of ``--out OUT`` writes: ``OUT.stage1/`` (stage 2 reads it from there)."""
    return out + ".stage1"


@dataclass(frozen=True)
class Stage1Settings:
    """Everything that changes stage 1's numbers (part of its fingerprint). Defaults: the authors' recipe."""

    resolution: int
    views: int = S1_VIEWS
    steps: int = S1_STEPS
    batch: int = 1
    samples: int = S1_SAMPLES
    lr: float = S1_LR
    min_lr: float = S1_MIN_LR
    warmup_frac: float = S1_WARMUP_FRAC
    weight_decay: float = S1_WEIGHT_DECAY
    freeze_after: float = S1_FREEZE_AFTER
    levels: int = FIELD_LEVELS
    features: int = FIELD_FEATURES
    extract_batch: int = S1_EXTRACT_BATCH
    seed: int = 0


@dataclass(frozen=True)
class Stage2Settings:
    """Everything that changes stage 2's numbers. ``lr`` None = the authors' ``blr * sqrt(batch / 256)``."""

    steps: int = S2_STEPS
    batch: int = S2_BATCH
    blr: float = S2_BLR
    lr: Optional[float] = None
    min_lr: float = S2_MIN_LR
    warmup_frac: float = S2_WARMUP_FRAC
    weight_decay: float = S2_WEIGHT_DECAY
    seed: int = 0

    @property
    def base_lr(self) -> float:
        return float(self.lr) if self.lr is not None else self.blr * math.sqrt(self.batch / 256)


# -- features and views --------------------------------------------------------------------------------------
def load_square(path: str, size: int, spec: BackboneSpec) -> torch.Tensor:
    """(3, size, size) normalised: the whole image resized to a square (bicubic), as DVT's
    ``transforms.Resize((H, W))`` does in both stages (the aspect ratio is not kept)."""
    from PIL import Image

    return read_image(path, lambda im: im.resize((size, size), Image.BICUBIC), spec.mean, spec.std)


@torch.no_grad()
def final_normed_patches(model: DenseModel, images: torch.Tensor) -> torch.Tensor:
    """(B, h, w, C) patch tokens after the final norm (before CLIP's ``proj``): what DVT denoises
    (timm ``forward_intermediates(norm=True)``) and where ``--method dvt`` acts."""
    tokens = model.run_blocks(model.start(images), 0, model.vision.num_blocks)
    x = model.vision.final_norm(tokens.x)[:, tokens.layout.patches]
    h, w = tokens.layout.grid
    return x.reshape(x.shape[0], h, w, x.shape[-1])


def grid_coords(h: int, w: int, y0: float = 0.0, y1: float = 1.0, x0: float = 0.0, x1: float = 1.0,
                flip: bool = False) -> torch.Tensor:
    """(h, w, 2) (x, y) coordinates in [0, 1] of a view's patch grid in the full image (DVT transform.py:
    a linspace over the crop box, mirrored when the view is flipped)."""
    ys, xs = torch.meshgrid(torch.linspace(y0, y1, h), torch.linspace(x0, x1, w), indexing="ij")
    if flip:
        xs = (xs.max() - xs) + xs.min()
    return torch.stack([xs, ys], dim=-1)


def crop_params(size: int, gen: torch.Generator) -> Tuple[int, int, int, int, bool]:
    """(top, left, height, width, flip) of one random resized crop: torchvision's ``RandomResizedCrop``
    draw (10 tries of area and log-ratio, then the centre crop) with DVT's scale and ratio, and a flip."""
    area = size * size
    lo, hi = math.log(S1_CROP_RATIO[0]), math.log(S1_CROP_RATIO[1])
    box = None
    for _ in range(10):
        target = area * (S1_CROP_SCALE[0] + (S1_CROP_SCALE[1] - S1_CROP_SCALE[0]) * float(torch.rand(1, generator=gen)))
        ratio = math.exp(lo + (hi - lo) * float(torch.rand(1, generator=gen)))
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= size and 0 < h <= size:
            i = int(torch.randint(0, size - h + 1, (1,), generator=gen))
            j = int(torch.randint(0, size - w + 1, (1,), generator=gen))
            box = (i, j, h, w)
            break
    if box is None:  # torchvision's fallback: the whole (square) image
        box = (0, 0, size, size)
    flip = float(torch.rand(1, generator=gen)) < S1_FLIP_PROB
    return (*box, flip)


def make_views(image: torch.Tensor, n: int, grid: Tuple[int, int], seed: Sequence[int]
               ) -> Tuple[List[Tuple[int, int, int, int, bool]], torch.Tensor]:
    """The crops of one image (deterministic in ``seed``) and their (n + 1, h, w, 2) coordinates; the last
    view is the full image (DVT appends it as view #769)."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    size = int(image.shape[-1])
    params = [crop_params(size, gen) for _ in range(n)]
    coords = [grid_coords(*grid, i / size, (i + h) / size, j / size, (j + w) / size, f) for i, j, h, w, f in params]
    coords.append(grid_coords(*grid))
    return params, torch.stack(coords)


def render_view(image: torch.Tensor, p: Tuple[int, int, int, int, bool]) -> torch.Tensor:
    """(3, S, S) crop resized back to the input size (bicubic, antialias, as torchvision's resized_crop), flipped."""
    i, j, h, w, flip = p
    size = int(image.shape[-1])
    v = F.interpolate(image[None, :, i:i + h, j:j + w], size=(size, size), mode="bicubic", antialias=True,
                      align_corners=False)[0]
    return v.flip(-1) if flip else v


@torch.no_grad()
def view_features(model: DenseModel, image: torch.Tensor, views: Sequence[Tuple[int, int, int, int, bool]],
                  batch: int, device: torch.device) -> torch.Tensor:
    """(len(views) + 1, h*w, C) final-normed features of the views and, last, of the full image (views are
    rendered batch by batch: 769 full-size crops at once would take gigabytes)."""
    out = []
    todo: List[Optional[Tuple[int, int, int, int, bool]]] = [*views, None]  # None: the full image
    for k in range(0, len(todo), batch):
        x = torch.stack([image if p is None else render_view(image, p) for p in todo[k:k + batch]]).to(device)
        f = final_normed_patches(model, x)
        out.append(f.reshape(f.shape[0], -1, f.shape[-1]).float())
    return torch.cat(out)


# -- stage-1 modules -----------------------------------------------------------------------------------------
def _uniform(shape: Sequence[int], bound: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(*shape, generator=gen) * 2 - 1) * bound


class BatchedMLP(nn.Module):
    """One independent MLP per image (weights (B, in, out)), ReLU between layers; nn.Linear's default init."""

    def __init__(self, n: int, sizes: Sequence[int], gen: torch.Generator) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(a)  # kaiming_uniform(a=sqrt(5)) and nn.Linear's bias bound are both 1/sqrt(fan_in)
            self.weights.append(nn.Parameter(_uniform((n, a, b), bound, gen)))
            self.biases.append(nn.Parameter(_uniform((n, 1, b), bound, gen)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if k < len(self.weights) - 1:
                x = F.relu(x)
        return x


def field_resolutions(grid: int, levels: int) -> List[int]:
    """Per-level grid sides: geometric from :data:`FIELD_BASE` to ``FIELD_MAX_FACTOR * grid`` (Instant-NGP's
    per-level scale, as DVT computes it for the hash grid)."""
    top = max(FIELD_BASE, FIELD_MAX_FACTOR * grid)
    scale = math.exp((math.log(top) - math.log(FIELD_BASE)) / max(1, levels - 1))
    return [int(math.floor(FIELD_BASE * scale ** lv + 1e-6)) for lv in range(levels)]


class SemanticFields(nn.Module):
    """``F`` for B images: multi-resolution dense feature grids (bilinear) and an MLP ``L*f -> C/2 -> C``."""

    def __init__(self, n: int, width: int, grid: int, levels: int, features: int, gen: torch.Generator) -> None:
        super().__init__()
        self.grids = nn.ParameterList(nn.Parameter(_uniform((n, features, r, r), FIELD_INIT, gen))
                                      for r in field_resolutions(grid, levels))
        self.mlp = BatchedMLP(n, (levels * features, width // 2, width), gen)  # neural_feature_field.py

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) (x, y) in [0, 1] -> (B, N, C)."""
        g = (coords * 2 - 1).unsqueeze(1)  # (B, 1, N, 2) in [-1, 1]
        enc = torch.cat([F.grid_sample(t, g, mode="bilinear", align_corners=True) for t in self.grids], dim=1)
        return self.mlp(enc[:, :, 0].transpose(1, 2))


def _cpu(obj: Any) -> Any:
    """Tensors of a (nested) state moved to the CPU: what one rank sends to another."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class Stage1State:
    """What a stage-1 checkpoint holds: the shared artifact ``G`` and the current batch's ``F``, ``h`` and
    optimiser. ``state_dict``/``load_state_dict`` rebuild the batch's modules (their size varies per batch).

    Under torchrun every rank fits its slice of each batch's images (their ``F`` and ``h`` live on that rank,
    initialised as the slice of the whole batch's seeded initialisation) and ``G`` is shared: the gradient of
    the batch's loss (a mean over equally many samples per image) is the mean of the ranks' gradients for ``G``
    and 1/world_size of the rank's own for ``F`` and ``h``, so the ranks take the single process's steps."""

    def __init__(self, width: int, grid: int, s: Stage1Settings, device: torch.device,
                 dist: Optional[Dist] = None) -> None:
        self.width, self.grid, self.s, self.device = width, grid, s, device
        self.dist = dist or Dist()
        gen = torch.Generator().manual_seed(s.seed)
        self.artifact = nn.Parameter((torch.randn(width, grid, grid, generator=gen) * S1_ARTIFACT_INIT_STD).to(device))
        self.chunk = -1
        self.n = 0  # images of the current batch (all ranks together)
        self.fields: Optional[SemanticFields] = None
        self.residual: Optional[BatchedMLP] = None
        self.opt: Optional[torch.optim.Optimizer] = None

    def rows(self, n: int) -> Tuple[int, int]:
        """This rank's images ``lo:hi`` of a batch of ``n`` (all of them in one process)."""
        b = n // self.dist.world_size
        return self.dist.rank * b, (self.dist.rank + 1) * b

    def start_chunk(self, chunk: int, n: int) -> None:
        """Fresh ``F``, ``h`` and optimiser for batch ``chunk`` of ``n`` images (seeded: resumable)."""
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.s.seed, 1, chunk]).generate_state(1)[0]))
        c = self.width
        fields = SemanticFields(n, c, self.grid, self.s.levels, self.s.features, gen)
        residual = BatchedMLP(n, (c, c // 4, c // 4, c), gen)  # offline_denoiser.py
        if self.dist.world_size > 1:  # keep this rank's images: every parameter is per image (first dim n)
            lo, hi = self.rows(n)
            with torch.no_grad():
                for p in [*fields.parameters(), *residual.parameters()]:
                    p.data = p.data[lo:hi].clone()
        self.fields, self.residual = fields.to(self.device), residual.to(self.device)
        params = [self.artifact, *self.fields.parameters(), *self.residual.parameters()]
        self.opt = torch.optim.Adam(params, lr=self.s.lr, betas=S1_BETAS, eps=S1_EPS, weight_decay=self.s.weight_decay)
        self.chunk, self.n = chunk, n

    def state_dict(self) -> Dict[str, Any]:
        """Under torchrun every rank must call it (the ranks' own ``F``, ``h`` and optimiser are gathered)."""
        out: Dict[str, Any] = {"artifact": self.artifact.detach().clone(), "chunk": self.chunk}
        if self.fields is not None:
            own = {"fields": self.fields.state_dict(), "residual": self.residual.state_dict(),
                   "opt": self.opt.state_dict()}
            out["n"] = self.n
            if self.dist.world_size == 1:
                out.update(own)
            else:
                out.update(world_size=self.dist.world_size, ranks=self.dist.gather(_cpu(own)))
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        with torch.no_grad():
            self.artifact.copy_(state["artifact"])
        self.chunk = int(state["chunk"])
        if "fields" in state or "ranks" in state:
            written = int(state.get("world_size", 1))
            if written != self.dist.world_size:
                raise ConfigError(f"the dvt stage-1 checkpoint was written by {written} process(es), this run has "
                                  f"{self.dist.world_size}: resume it with as many torchrun processes (the images "
                                  f"of a batch are split between them), or delete the checkpoint to start over")
            own = state if written == 1 else state["ranks"][self.dist.rank]
            self.start_chunk(self.chunk, int(state["n"]))
            self.fields.load_state_dict(own["fields"])
            self.residual.load_state_dict(own["residual"])
            self.opt.load_state_dict(own["opt"])

    def lr_at(self, j: int) -> float:
        """Linear warmup, then half-cosine to ``min_lr`` (dvt/utils/misc.py ``adjust_learning_rate``)."""
        s = self.s
        warm = int(round(s.warmup_frac * s.steps))
        if j < warm:
            return s.lr * j / warm
        return s.min_lr + (s.lr - s.min_lr) * 0.5 * (1 + math.cos(math.pi * (j - warm) / max(1, s.steps - warm)))

    def step(self, j: int, feats: torch.Tensor, coords: torch.Tensor, gen: torch.Generator) -> Dict[str, float]:
        """One optimisation step of the current batch (``j``: its step index); DVT's loss."""
        s, c, hw = self.s, self.width, self.grid * self.grid
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(j)
        second = j > int(s.freeze_after * s.steps)  # G frozen and h on (main_img_denoising.py)
        b, m, _ = feats.shape
        lo, hi = self.rows(self.n) if self.n else (0, b)
        # the samples of the whole batch, then this rank's rows: a split batch draws what one process draws
        idx = torch.randint(0, m, (max(self.n, b), s.samples), generator=gen)[lo:hi].to(feats.device)
        raw = feats.gather(1, idx[..., None].expand(-1, -1, c))
        xy = coords.gather(1, idx[..., None].expand(-1, -1, 2))
        # G at the view-local patch position (an embedding lookup: its CPU backward is deterministic, indexing's is not)
        art = F.embedding(idx % hw, self.artifact.reshape(c, hw).t())
        if second:
            art = art.detach()
        sem = self.fields(xy)
        pred = sem + art
        if second:
            res = self.residual(raw)
            pred = pred + res.detach()
        mse = F.mse_loss(pred, raw)
        cos = 1 - F.cosine_similarity(pred, raw, dim=-1).mean()
        loss = mse + cos
        out = {"loss": 0.0, "mse": float(mse.detach()), "cos": float(cos.detach())}
        if second:
            rl = S1_RESIDUAL_WEIGHT * F.mse_loss(res, (raw - sem - art).detach())
            sp = S1_SPARSITY_WEIGHT * res.abs().mean()
            loss = loss + rl + sp
            out.update(residual=float(rl.detach()), sparsity=float(sp.detach()))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.dist.world_size > 1:  # G: mean over ranks; F and h: this rank's images' share of the batch mean
            self.dist.average_gradients([self.artifact])
            for p in [*self.fields.parameters(), *self.residual.parameters()]:
                if p.grad is not None:
                    p.grad /= self.dist.world_size
        self.opt.step()
        out["loss"] = float(loss.detach())
        return out

    @torch.no_grad()
    def denoised(self) -> torch.Tensor:
        """(B, C, h, w): ``F`` on the full image's patch grid (DVT's stored ``denoised_features``)."""
        n = int(self.fields.grids[0].shape[0])
        xy = grid_coords(self.grid, self.grid).reshape(1, -1, 2).expand(n, -1, -1).to(self.device)
        f = self.fields(xy)
        return f.transpose(1, 2).reshape(n, self.width, self.grid, self.grid)


def _step_generator(seed: int, step: int) -> torch.Generator:
    """The sampling RNG of one step: a function of (seed, step) only, so a resumed run draws the same samples."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 2, step]).generate_state(1)[0]))


def stage1(model: DenseModel, paths: Sequence[str], folder: str, s: Stage1Settings, device: torch.device,
           show_progress: bool = True, checkpoint_every: int = 100, kill_after: Optional[int] = None,
           dist: Optional[Dist] = None) -> str:
    """Fit stage 1 on ``paths``; write ``folder/features/*.pt`` and ``folder/stage1.pt``; return the latter.

    Under torchrun each batch's images are shared out (each rank extracts and fits its slice; see
    :class:`Stage1State`), so every batch must split evenly over the ranks."""
    dist = dist or Dist()
    spec = model.spec
    p = spec.patch_size
    if s.resolution % p:
        raise ConfigError(f"--resolution {s.resolution}: not a multiple of the patch size {p} of {spec.id!r}")
    if s.views < 1 or s.steps < 1 or s.batch < 1:
        raise ConfigError(f"dvt stage 1 needs --views, --stage1-steps and --batch-size >= 1 "
                          f"(got {s.views}, {s.steps}, {s.batch})")
    grid, width = s.resolution // p, model.vision.width
    chunks = [list(range(i, min(i + s.batch, len(paths)))) for i in range(0, len(paths), s.batch)]
    dist.per_rank(s.batch, "--batch-size")
    if len(chunks[-1]) % dist.world_size:
        raise ConfigError(f"dvt stage 1: {len(paths)} images in batches of --batch-size {s.batch} leave a last batch "
                          f"of {len(chunks[-1])} images, which does not split over {dist.world_size} torchrun "
                          f"processes; use a number of images (--num-images) that is a multiple of {s.batch}")
    fp = fingerprint({"stage": 1, "backbone": spec.id, "weights": model.backbone.weights_id,
                      "images": files_fingerprint(paths), "settings": asdict(s)})
    result_path = os.path.join(folder, STAGE1_FILE)
    if os.path.isfile(result_path) and _read_ours(result_path).get("fingerprint") == fp:
        return result_path  # already done with these images and settings
    state = Stage1State(width, grid, s, device, dist)
    loop = DistillLoop(out=result_path, total_steps=len(chunks) * s.steps, fingerprint=fp, modules={"stage1": state},
                       checkpoint_every=checkpoint_every, show_progress=show_progress, desc=f"dvt stage 1 {spec.id}",
                       kill_after=kill_after, dist=dist)
    cache: Dict[str, Any] = {"chunk": None}
    feat_dir = os.path.join(folder, FEATURES_DIR)
    model.eval()

    def mine(k: int) -> List[int]:  # this rank's images of batch k
        lo, hi = state.rows(len(chunks[k]))
        return chunks[k][lo:hi]

    def load_chunk(k: int) -> None:
        feats, coords = [], []
        for i in mine(k):
            img = load_square(paths[i], s.resolution, spec)
            views, xy = make_views(img, s.views, (grid, grid), (s.seed, 0, i))
            feats.append(view_features(model, img, views, s.extract_batch, device))
            coords.append(xy.reshape(-1, 2))
        cache.update(chunk=k, feats=torch.stack([f.reshape(-1, width) for f in feats]),
                     coords=torch.stack(coords).to(device))

    def step_fn(step: int) -> Dict[str, float]:
        k, j = divmod(step, s.steps)
        if state.chunk != k:
            state.start_chunk(k, len(chunks[k]))
        if cache["chunk"] != k:
            load_chunk(k)
        scalars = state.step(j, cache["feats"], cache["coords"], _step_generator(s.seed, step))
        if j == s.steps - 1:  # the batch is fitted: write its images' features
            den = state.denoised().cpu()
            raw = cache["feats"].reshape(len(mine(k)), s.views + 1, grid * grid, width)[:, -1]
            for n, i in enumerate(mine(k)):
                atomic_save({"raw": raw[n].t().reshape(width, grid, grid).cpu().clone(), "denoised": den[n].clone(),
                             "image": paths[i], "index": i}, os.path.join(feat_dir, f"{i:06d}.pt"))
        return scalars

    loop.run(step_fn)
    meta = {"backbone": spec.id, "weights_id": model.backbone.weights_id, "width": width, "grid": grid,
            "patch_size": p, "images": list(paths), "settings": asdict(s)}
    loop.finish({"artifact": state.artifact.detach().cpu().clone(), "fingerprint": fp, "harness": meta},
                f"DVT stage 1: {spec.id}, {len(paths)} images")
    return result_path


# -- stage 2 -----------------------------------------------------------------------------------------------
def _read_ours(path: str) -> Dict[str, Any]:
    """A file this module wrote (tensors and plain containers only)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: unreadable ({type(e).__name__}: {e}); delete it to redo that stage") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: not a file written by `harness distill dvt`; delete it to redo that stage")
    return data


def read_stage1(folder: str, backbone: Optional[str] = None) -> Dict[str, Any]:
    """Stage 1's result in ``folder`` (a clear error when it is missing or for another backbone)."""
    path = os.path.join(folder, STAGE1_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{folder}: no finished DVT stage-1 output ({STAGE1_FILE}); run `harness distill dvt "
                        f"--stage 1` with the same --out first")
    data = _read_ours(path)
    meta = data.get("harness") or {}
    if backbone is not None and meta.get("backbone") != backbone:
        raise ConfigError(f"{path}: stage 1 ran on backbone {meta.get('backbone')!r}, not --backbone {backbone}")
    return data


#: stage-1 pairs kept in memory by stage 2 (beyond this they are re-read from disk: 10k ViT-B/14 images are 84 GB)
PAIR_CACHE_BYTES = 4 << 30


class PairStore:
    """Stage-1 (raw, denoised) pairs by image index, as (h, w, C) tensors; the first ones read stay in memory."""

    def __init__(self, folder: str, n: int, max_bytes: int = PAIR_CACHE_BYTES) -> None:
        self.folder, self.n, self.max_bytes, self.bytes = folder, n, max_bytes, 0
        self._cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if i in self._cache:
            return self._cache[i]
        path = os.path.join(self.folder, FEATURES_DIR, f"{i:06d}.pt")
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing stage-1 features; rerun `harness distill dvt --stage 1`")
        d = _read_ours(path)
        pair = (d["raw"].permute(1, 2, 0).float(), d["denoised"].permute(1, 2, 0).float())
        size = 2 * pair[0].numel() * 4
        if self.bytes + size <= self.max_bytes:
            self._cache[i] = pair
            self.bytes += size
        return pair

    def batch(self, idx: Sequence[int], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.get(i) for i in idx]
        return (torch.stack([a for a, _ in pairs]).to(device), torch.stack([b for _, b in pairs]).to(device))


def cosine_lr(step: int, base: float, final: float, total: int, warmup: int) -> float:
    """DVT's ``CosineScheduler`` (dvt/utils/misc.py): ``linspace(0, base, warmup)``, then half-cosine to ``final``."""
    if step < warmup:
        return base * step / (warmup - 1) if warmup > 1 else 0.0
    n = max(1, total - warmup)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (step - warmup) / n))


def denoiser_loss(pred: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
    """``MSE + (1 - cos)`` over the channel dimension (main_denoiser.py)."""
    mse = F.mse_loss(pred, target)
    cos = 1 - F.cosine_similarity(pred, target, dim=-1).mean()
    loss = mse + cos
    return loss, {"loss": float(loss.detach()), "mse": float(mse.detach()), "cos": float(cos.detach())}


def stage2(folder: str, out: str, s: Stage2Settings, device: torch.device, backbone: Optional[str] = None,
           show_progress: bool = True, checkpoint_every: int = 100, kill_after: Optional[int] = None,
           dist: Optional[Dist] = None) -> str:
    """Train the denoiser on stage 1's pairs in ``folder``; write ``out`` (authors' format + our metadata).

    Under torchrun each rank trains on its slice of every global batch and the gradients are averaged: the
    loss is a mean over equally many tokens per rank and the batches are drawn from the seed alone, so the
    ranks together take the single process's steps (up to float rounding)."""
    dist = dist or Dist()
    s1 = read_stage1(folder, backbone)
    meta1 = s1["harness"]
    n, width, grid = len(meta1["images"]), int(meta1["width"]), int(meta1["grid"])
    if s.steps < 1 or s.batch < 1:
        raise ConfigError(f"dvt stage 2 needs --steps and --batch-size >= 1 (got {s.steps}, {s.batch})")
    dist.per_rank(s.batch, "--batch-size")
    fp = fingerprint({"stage": 2, "stage1": s1["fingerprint"], "settings": asdict(s)})
    if os.path.isfile(out) and (_read_ours(out).get("harness") or {}).get("fingerprint") == fp:
        return out
    heads = default_heads(width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = DenoiserNet(width, grid, heads).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=s.base_lr, betas=S2_BETAS, weight_decay=s.weight_decay)
    warmup = int(s.steps * s.warmup_frac)
    store = PairStore(folder, n)
    loop = DistillLoop(out=out, total_steps=s.steps, fingerprint=fp, modules={"denoiser": net, "optimizer": opt},
                       checkpoint_every=checkpoint_every, show_progress=show_progress,
                       desc=f"dvt stage 2 {meta1['backbone']}", kill_after=kill_after, dist=dist)
    batches: Dict[str, Iterator[List[int]]] = {}
    net.train()

    def step_fn(step: int) -> Dict[str, float]:
        if "it" not in batches:  # created at the first step this process runs (a resume starts mid-way)
            batches["it"] = rank_slices(cycle_batches(n, s.batch, s.seed, step), dist)
        raw, target = store.batch(next(batches["it"]), device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, s.base_lr, s.min_lr, s.steps, warmup)
        loss, scalars = denoiser_loss(net(raw), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(net.parameters())  # DDP: the gradient of the global batch's mean loss
        opt.step()
        return scalars

    loop.run(step_fn)
    meta = {"format": "dvt-denoiser", "backbone": meta1["backbone"], "weights_id": meta1["weights_id"],
            "width": width, "num_heads": heads, "num_blocks": 1, "pos_grid": grid, "fingerprint": fp,
            "stage1": os.path.abspath(folder), "images": n, "settings": asdict(s)}
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    loop.finish({"denoiser": state, "step": s.steps, "harness": meta}, f"DVT stage 2: {meta1['backbone']}")
    return out


# -- CLI ----------------------------------------------------------------------------------------------------
STAGES = ("1", "2", "all")


def _settings(args: argparse.Namespace, spec: Optional[BackboneSpec], n_images: Optional[int]
              ) -> Tuple[Optional[Stage1Settings], Stage2Settings]:
    """The CLI's numbers: ``--batch-size`` is images per step in both stages (stage 1: fitted together);
    ``--steps``/``--epochs`` are stage 2's, ``--stage1-steps`` and ``--views`` stage 1's."""
    seed = int(args.seed)
    s1 = None
    if spec is not None:
        s1 = Stage1Settings(resolution=int(args.resolution or default_resolution(spec.patch_size)), seed=seed)
        over = {k: v for k, v in (("views", getattr(args, "views", None)),
                                  ("steps", getattr(args, "stage1_steps", None)),
                                  ("batch", args.batch_size)) if v is not None}
        s1 = replace(s1, **{k: int(v) for k, v in over.items()})
    s2 = Stage2Settings(seed=seed)
    if args.batch_size is not None:
        s2 = replace(s2, batch=int(args.batch_size))
    if args.steps is not None:
        s2 = replace(s2, steps=int(args.steps))
    elif args.epochs is not None and n_images:
        s2 = replace(s2, steps=max(1, math.ceil(int(args.epochs) * n_images / s2.batch)))
    return s1, s2


def run(args: argparse.Namespace) -> int:
    """``harness distill dvt``: stage 1, stage 2 or both (``--stage``, default all)."""
    from ..models import build_dense_model
    from ..registry import BACKBONES
    from ..runtime import init_distributed, select_device

    stage = str(args.stage or "all").lower()
    if stage not in STAGES:
        raise ConfigError(f"--stage {args.stage}: dvt has stages 1 (per-image neural fields), 2 (denoiser) or all")
    dist = init_distributed()
    device = select_device(args.device, dist)
    folder = stage1_dir(args.out)
    show = not args.no_progress
    kill_after = getattr(args, "kill_after", None)  # test hook
    spec = BACKBONES.get(args.backbone)
    if stage in ("1", "all"):
        paths = list_images(args.images, args.num_images)
        s1, _ = _settings(args, spec, len(paths))
        model = build_dense_model(args.backbone, "vanilla", weights=args.weights, random_init=args.random_init,
                                  allow_download=args.download).to(device)
        stage1(model, paths, folder, s1, device, show, args.checkpoint_every, kill_after, dist)
        dist.barrier()  # every rank's feature files are written before stage 2 reads them
        if dist.is_main:
            print(f"dvt stage 1: {len(paths)} images -> {folder}/ (shared artifact term: {folder}/{STAGE1_FILE})")
        del model
    if stage in ("2", "all"):
        n = len(read_stage1(folder, spec.id)["harness"]["images"])
        _, s2 = _settings(args, None, n)
        stage2(folder, args.out, s2, device, spec.id, show, args.checkpoint_every, kill_after, dist)
        if dist.is_main:
            print(f"wrote {args.out}  (use: --method dvt --method-weights {args.out})")
    return 0


__all__ = ["STAGE1_FILE", "Stage1Settings", "Stage1State", "Stage2Settings", "final_normed_patches", "make_views",
           "read_stage1", "run", "stage1", "stage1_dir", "stage2"]
