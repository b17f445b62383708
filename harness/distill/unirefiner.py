"""``harness distill unirefiner``: refine a CLIP vision tower with UniRefiner (Qiu et al., "Teaching Pre-trained
ViTs to Self-Dispose Dross via Contrastive Register", CVPR 2026, arXiv:2605.19622) on a folder of unlabelled
images; the output loads with ``--method unirefiner --method-weights OUT``.

The recipe follows the authors' trainer (github.com/CongpeiQiu/UniRefiner @ 38f4e71b:
``unirefiner/method/unirefiner.py``, ``method/losses.py``, ``spurious_filtering/*.py``,
``models/channel_mask.py``, ``training/*.py``, ``configs/*.yaml``). Per step, for a batch of images resized to
the training size (bicubic, no other augmentation):

1. **Student** (the tower with LoRA) on the image padded with a ring of filler patches
   (``harness.methods.unirefiner.pad_ring``; ring ``max(grid // 32, 1)``, fill ``--fill``, zero by default):
   image tokens ``z`` and ring tokens ``g`` (the "contrastive registers"), final ``ln_post`` output, no CLS.
2. **Crops**: 3 random boxes per image (area 0.25-0.5, aspect 2/3-3/2); the student's crop tokens ``s`` are
   RoI-aligned from its full-image token grid; the crop pixels are RoI-aligned to the full size.
3. **Teacher** (the frozen backbone, positional embedding interpolated as transformers' CLIP does): each crop
   with a strip of the fixed reference image pasted on a random side (0.35 of the grid, even), recording q/k
   at the AH layers; the plain image ``f``; the reference ``u``.
4. **Target snapping**: each crop token of the composite is replaced by its nearest full-image teacher token.
5. **Detectors** (``unirefiner_detectors``): FP-GP inter (vs ``u``) and intra (vs the strip), the adaptive
   register detector, attention hijacking; spurious targets for the ring drawn from the FP-GP top 40%.
6. **Losses** (``unirefiner_losses``): ``L_ref + 0.1 L_abs + 0.4 L_scd`` (SCD after 10% of the steps, its target
   the student's no-grad tokens of the crops padded with a ring of ``max(r, 4)``), tau 0.2.

Cosines in 5-6 skip up to five "lazy" channels chosen before training (``unirefiner_channels``).
LoRA r 8, alpha 16, dropout 0.1 on every Linear of the tower (``linear_r-8`` preset, through ``peft``),
merged at the end. AdamW, lr 1e-4 x batch / 16, weight decay 0.1 except on 1-D tensors, biases and norms,
betas (0.9, 0.98) / eps 1e-6 for ViT model names (``default_optimizer_params``), constant lr, 2 epochs, bf16
autocast on CUDA.

Under torchrun each rank trains on a slice of every global batch and the gradients are averaged, but the run is
*not* the single process's: a step's crop boxes, strip side, detector samples and LoRA dropout are drawn from
one stream over the rank's images (per-rank seeds), and the losses average over the masked tokens of the rank's
images (uneven counts per rank), so a split batch is a different (equally valid) draw.

Files: ``OUT`` the merged tower in the authors' Hugging Face layout (their ``model_final.pt``),
``OUT-stem.epochK.pt`` after each epoch as ``{"state_dict": <PEFT state dict>}`` (their ``epoch_K.pt``),
``OUT.json`` everything that identifies the run, plus ``OUT.curves.csv``/``.png`` and, while running,
``OUT.ckpt.pt`` (``harness.distill.common.DistillLoop``: resumes after a kill).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..backbones.base import Backbone
from ..errors import ConfigError
from ..image_folder import list_images, read_image
from ..methods.unirefiner import FILLS, RingCLIP, check_fill, pad_ring, ring_size, split_ring
from ..methods.unirefiner_hf import LORA_ALPHA, LORA_DROPOUT, LORA_R, HFCLIPVision, lora_targets
from ..models import build_dense_model
from ..runtime import device_description, init_distributed, select_device
from . import unirefiner_channels as channels
from . import unirefiner_crops as crops
from . import unirefiner_losses as losses
from .common import DistillLoop, atomic_save, cycle_batches, files_fingerprint, fingerprint, rank_slices
from .phreg import TrainableState
from .unirefiner_detectors import ADAPTIVE_THRESHOLD, AH_SIGMA, FP_GP_SIGMA, detect

#: native-224 backbones are trained at 448 (``image_size: 448`` for LAION CLIP ViT-g/14 and InternViT-6B-224px,
#: configs/laion_clip_giant.yaml, configs/internvit_6b_224px.yaml)
RESOLUTION = 448
#: ``lr: 1.0e-4`` at the reference batch 16 (REFERENCE_TOTAL_BATCH_SIZE, training/optimizer.py), ``wd: 0.1``,
#: ``epochs: 2`` (every configs/*.yaml); batch 16 per step as the RICE-L and SigLIP2 So400M recipes
LR, REFERENCE_BATCH, WEIGHT_DECAY, EPOCHS, BATCH = 1e-4, 16, 0.1, 2, 16
#: AdamW betas/eps for model names containing "vit", else (default_optimizer_params, training/optimizer.py)
VIT_ADAM, OTHER_ADAM = ((0.9, 0.98), 1e-6), ((0.9, 0.999), 1e-8)
#: ``uniformity_strength``: 0.3 in four of the seven recipes (LAION CLIP-g, DINOv2-g, SigLIP2 So400M, RICE-L)
UNIFORMITY = 0.3
#: SCD target ring: ``spatial_register_size = max(register_size, 4)`` (UniRefinerMethod.forward)
SCD_RING = 4
#: AH layers of the recipes that use AH, as (first, last) block and depth: EVA-CLIP-8B 10-15 of 32,
#: InternViT-6B 29-31 of 48, SigLIP2 So400M 10-15 of 27, SigLIP2 giant-opt 20-25 of 40, RICE-L 9-11 of 24
#: (configs/*.yaml). Their median relative first and last block are 0.375 and 0.56 of the depth.
AH_RELATIVE = (0.375, 0.56)


def default_ah_layers(depth: int) -> Tuple[int, int]:
    """The default AH block range for a ``depth``-block tower: the recipes' median relative depth (AH_RELATIVE),
    rounded half up; ViT-B/16 (12 blocks): 5-7, ViT-L/14 (24): 9-13, the 4-block test model: 2-2."""
    lo = min(depth - 1, int(np.floor(AH_RELATIVE[0] * depth + 0.5)))
    hi = min(depth - 1, max(lo, int(np.floor(AH_RELATIVE[1] * depth + 0.5))))
    return lo, hi


def parse_ah_layers(value: Optional[str], depth: int) -> Optional[Tuple[int, int]]:
    """``--ah-layers START-END`` (0-based blocks, inclusive), ``off`` or None (the default) -> range or None."""
    if value is None or str(value).strip() == "":
        return default_ah_layers(depth)
    text = str(value).strip().lower()
    if text == "off":
        return None
    try:
        lo, hi = (int(p) for p in text.split("-"))
    except ValueError:
        raise ConfigError(f"--ah-layers {value!r}: write START-END (0-based blocks, e.g. 5-7) or off") from None
    if not 0 <= lo <= hi < depth:
        raise ConfigError(f"--ah-layers {value!r}: need 0 <= START <= END < {depth} (the tower has {depth} blocks)")
    return lo, hi


# -- data ----------------------------------------------------------------------------------------------------
def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class _Resized(torch.utils.data.Dataset):
    """Images resized to ``size`` x ``size`` (bicubic) and normalised, as the authors' training transform."""

    def __init__(self, paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.paths, self.size, self.mean, self.std = list(paths), size, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        return read_image(self.paths[i], lambda im: im.resize((self.size, self.size), Image.BICUBIC), self.mean,
                          self.std)


# -- encoders ------------------------------------------------------------------------------------------------
def teacher_tokens(backbone: Backbone, images: torch.Tensor, layers: Sequence[int] = ()
                   ) -> Tuple[torch.Tensor, List[Tuple[torch.Tensor, torch.Tensor]]]:
    """The frozen backbone's final-normed patch tokens (B, N, D) (no projection, no CLS) and, for each block in
    ``layers``, its q and k projections of the patch tokens (B, N, D) (heads merged, before scaling)."""
    t = backbone.embed(images)
    x = backbone.pre_norm(t.x)
    b, length, d = x.shape
    qk = []
    for i in range(backbone.num_blocks):
        parts = backbone.block(i)
        if i in layers:
            q, k, _ = parts.qkv(parts.norm1(x))
            merge = [a.permute(0, 2, 1, 3).reshape(b, length, -1)[:, t.layout.patches] for a in (q, k)]
            qk.append((merge[0], merge[1]))
        x = parts.run(x)
    return backbone.final_norm(x)[:, t.layout.patches], qk


def student_tokens(tower: nn.Module, images: torch.Tensor, ring: int, fill: str, gen: Optional[torch.Generator]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The student's (image tokens (B, n*n, D), ring tokens (B, R, D)) on the ring-padded images."""
    x, grid = tower(pad_ring(images, tower.patch_size, ring, fill, gen))
    return split_ring(x[:, 1:], grid, ring)


def build_student(backbone: Backbone) -> nn.Module:
    """The HF-named copy of the backbone's tower with LoRA on every Linear (``peft``)."""
    from peft import LoraConfig, get_peft_model

    tower = HFCLIPVision(backbone.visual).to(next(backbone.parameters()).device)
    cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, bias="none",
                     target_modules=lora_targets(tower))
    return get_peft_model(tower, cfg)


def optimizer_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """No decay on 1-D tensors, biases and norms (``_parameter_groups_for_adamw``, training/optimizer.py)."""
    def exempt(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": weight_decay}]


@torch.no_grad()
def lazy_channels(backbone: Backbone, data: torch.utils.data.Dataset, seed: int, batch: int = 8) -> Dict[str, Any]:
    """Choose the lazy channels on up to 64 images x 128 tokens of the untrained student (= the backbone)."""
    rng = np.random.default_rng(_seed(seed, 17))
    n = min(channels.SAMPLES, len(data))
    idx = sorted(rng.choice(len(data), n, replace=False).tolist())
    device = next(backbone.parameters()).device
    feats = []
    for start in range(0, n, batch):
        imgs = torch.stack([data[i] for i in idx[start:start + batch]]).to(device)
        tok = teacher_tokens(backbone, imgs)[0].float().cpu()
        if tok.shape[1] > channels.TOKENS_PER_IMAGE:
            tok = torch.stack([t[torch.from_numpy(rng.choice(t.shape[0], channels.TOKENS_PER_IMAGE, replace=False))]
                               for t in tok])
        feats.append(tok)
    out = channels.select_lazy_channels(torch.cat(feats))
    out["images"] = n
    return out


# -- one step ------------------------------------------------------------------------------------------------
class Step:
    """One UniRefiner step (module docstring); holds the models, the reference tokens and the settings."""

    def __init__(self, backbone: Backbone, student: nn.Module, reference: torch.Tensor, mask: List[int],
                 ah: Optional[Tuple[int, int]], fill: str, uniformity: float, snapping: bool = True,
                 fp_gp_cosine: Optional[float] = None) -> None:
        self.backbone, self.student, self.mask = backbone, student, mask
        self.tower = student.base_model.model
        self.reference = reference
        self.layers = list(range(ah[0], ah[1] + 1)) if ah else []
        self.fill, self.uniformity, self.snapping = fill, uniformity, snapping
        self.fp_gp_cosine = fp_gp_cosine
        self.patch = backbone.spec.patch_size
        with torch.no_grad():
            self.u = self.norm(teacher_tokens(backbone, reference)[0])
        self.last: Dict[str, float] = {}

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(channels.apply_mask(x.float(), self.mask), dim=-1)

    def __call__(self, images: torch.Tensor, gen: torch.Generator, progress: float) -> Dict[str, torch.Tensor]:
        b, _, size, _ = images.shape
        n = size // self.patch
        p = crops.PROPOSALS
        r = ring_size(n)
        z, g = student_tokens(self.tower, images, r, self.fill, gen)
        z, g = self.norm(z), self.norm(g)
        boxes = crops.crop_boxes(b * p, gen).view(b, p, 4).to(images.device)
        s = self.norm(crops.crop_tokens(z, n, boxes))
        z_rep, g_rep = z.repeat_interleave(p, 0), g.repeat_interleave(p, 0)
        with torch.no_grad():
            crop_images = crops.roi_align(images, boxes, size)
            side = int(torch.randint(4, (1,), generator=gen))
            comp, fg_mask = crops.compose(crop_images, self.reference, self.patch, side)
            tok, qk = teacher_tokens(self.backbone, comp, self.layers)
            tok = self.norm(tok)
            fg = tok[fg_mask].view(b * p, n * n, -1)
            strip = tok[~fg_mask].view(b * p, -1, tok.shape[-1])
            qk = [(q[fg_mask].view(b * p, n * n, -1), k[fg_mask].view(b * p, n * n, -1)) for q, k in qk]
            f = self.norm(teacher_tokens(self.backbone, images)[0]).repeat_interleave(p, 0)
            snapped = losses.snap(fg, f)
            det = detect(fg, strip, self.u, snapped, g_rep.detach(), qk, gen, fp_gp_cosine=self.fp_gp_cosine)
            spurious = losses.snap(det.spurious, f)
        target, negatives = (snapped, f) if self.snapping else (fg, fg)
        ref, theta = losses.refinement_loss(s, target, det.clean, negatives, z_rep, g_rep, self.uniformity)
        absorb = losses.absorption_loss(g_rep, s, spurious, theta)
        scd = ref.new_zeros(())
        if progress > losses.SCD_START:
            with torch.no_grad():
                wide = max(r, SCD_RING)
                e = self.norm(student_tokens(self.tower, crop_images, wide, self.fill, gen)[0])
            scd = losses.scd_loss(s, e)
        total = losses.total_loss(ref, absorb, scd, progress)
        out = {"loss": total, "ref": ref, "abs": absorb, "scd": scd,
               "clean": det.clean.float().mean(), "alignment": (s * target).sum(-1)[det.clean].mean()
               if bool(det.clean.any()) else (s * target).sum(-1).mean()}
        out.update({f"keep_{k}": v.float().mean() for k, v in det.masks().items()})
        return out


# -- the command ---------------------------------------------------------------------------------------------
def _epoch_path(out: str, epoch: int) -> str:
    stem, _ = os.path.splitext(out)
    return f"{stem}.epoch{epoch}.pt"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(args: argparse.Namespace) -> int:
    """``harness distill unirefiner --backbone ID --images DIR --out FILE``: train, write the files, return 0."""
    if getattr(args, "stage", None) is not None:
        raise ConfigError(f"--stage {args.stage}: stages are for `harness distill dvt`; UniRefiner has one stage")
    dist = init_distributed()
    device = select_device(args.device, dist)
    backbone = build_dense_model(args.backbone, "vanilla", weights=args.weights, random_init=args.random_init,
                                 allow_download=args.download).backbone.to(device)
    if not hasattr(backbone, "visual") or not hasattr(backbone.visual, "transformer"):
        raise ConfigError(f"harness distill unirefiner refines CLIP vision towers (open_clip backbones such as "
                          f"clip-b16-openai), not {backbone.spec.id!r}")
    patch = backbone.spec.patch_size
    res = int(args.resolution or RESOLUTION)
    if res < patch or res % patch:
        raise ConfigError(f"--resolution {res}: must be a positive multiple of the patch size {patch}")
    batch = int(args.batch_size or BATCH)
    if batch < 1:
        raise ConfigError(f"--batch-size must be >= 1 (got {batch})")
    dist.per_rank(batch, "--batch-size")  # torchrun: each rank its slice of every global batch
    fill = check_fill(getattr(args, "fill", None) or "zero", "--fill")
    ah = parse_ah_layers(getattr(args, "ah_layers", None), backbone.num_blocks)
    uniformity = float(getattr(args, "uniformity", None) or UNIFORMITY)
    fp_gp_cosine = getattr(args, "fp_gp_cosine", None)
    if fp_gp_cosine is not None and not -1.0 <= fp_gp_cosine <= 1.0:
        raise ConfigError(f"--fp-gp-cosine must be a cosine in [-1, 1] (got {fp_gp_cosine})")
    ref_path = getattr(args, "reference_image", None)
    if ref_path is not None and not os.path.isfile(ref_path):
        raise ConfigError(f"--reference-image {ref_path}: no such file")
    paths = list_images(args.images, args.num_images)
    per_epoch = max(1, len(paths) // batch)
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1 (got {args.steps})")
    epochs = int(args.epochs or EPOCHS)
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1 (got {epochs})")
    total = int(args.steps) if args.steps is not None else epochs * per_epoch
    seed = int(args.seed)
    lr_reference = float(getattr(args, "lr", None) or LR)
    if lr_reference <= 0:
        raise ConfigError(f"--lr must be > 0 (got {lr_reference})")
    lr = lr_reference * batch / REFERENCE_BATCH
    (betas, eps) = VIT_ADAM if "vit" in f"{backbone.spec.arch} {backbone.spec.id}".lower() else OTHER_ADAM

    data = _Resized(paths, res, backbone.spec.mean, backbone.spec.std)
    # the frozen teacher: the backbone's stages with the positional-embedding rule of the authors' HF tower
    teacher = RingCLIP(backbone, 0, "zero", 0, "size")
    mask = lazy_channels(teacher, data, seed)
    reference = crops.reference_tensor(res, backbone.spec.mean, backbone.spec.std, ref_path).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(seed, 3))  # LoRA A's initialisation
        student = build_student(backbone)
    step = Step(teacher, student, reference, mask["masked_channels"], ah, fill, uniformity,
                fp_gp_cosine=fp_gp_cosine)
    optimizer = torch.optim.AdamW(optimizer_groups(student, WEIGHT_DECAY), lr=lr, betas=betas, eps=eps)
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    ring = ring_size(res // patch)
    settings = {"backbone": backbone.spec.id, "weights": backbone.weights_id, "resolution": res,
                "batch_size": batch, "steps": total, "steps_per_epoch": per_epoch, "epochs": epochs, "lr": lr,
                "lr_reference": lr_reference, "reference_batch": REFERENCE_BATCH, "weight_decay": WEIGHT_DECAY,
                "betas": list(betas), "eps": eps, "schedule": "constant",
                "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "targets": "every Linear"},
                "ring": ring, "fill": fill, "fill_authors_name": FILLS[fill], "scd_ring": max(ring, SCD_RING),
                "proposals": crops.PROPOSALS, "crop_scale": list(crops.CROP_SCALE),
                "crop_ratio": list(crops.CROP_RATIO), "strip_ratio": crops.STRIP_RATIO,
                "fp_gp_sigma": FP_GP_SIGMA if fp_gp_cosine is None else None, "fp_gp_cosine": fp_gp_cosine,
                "adaptive_threshold": ADAPTIVE_THRESHOLD, "ah_sigma": AH_SIGMA,
                "ah_layers": list(ah) if ah else "off", "uniformity": uniformity, "tau": losses.TAU,
                "loss_weights": {"abs": losses.ABS_WEIGHT, "scd": losses.SCD_WEIGHT, "scd_start": losses.SCD_START},
                "target_snapping": True, "channel_mask": mask, "pos_interpolation": "size (transformers CLIP)",
                "reference_image": ({"file": os.path.abspath(ref_path), "sha256": _sha256(ref_path)} if ref_path else
                                    {"generated": True, "size": crops.REFERENCE_SIZE, "seed": crops.REFERENCE_SEED}),
                "seed": seed, "images": len(paths), "images_fingerprint": files_fingerprint(paths)}
    fp = fingerprint({**settings, "version": 1})
    loop = DistillLoop(out=args.out, total_steps=total, fingerprint=fp,
                       modules={"lora": TrainableState(trainable), "optimizer": optimizer},
                       checkpoint_every=max(1, int(args.checkpoint_every)), show_progress=not args.no_progress,
                       desc=f"distill unirefiner {backbone.spec.id}", kill_after=getattr(args, "kill_after", None),
                       dist=dist)
    amp = device.type == "cuda"
    stream: Dict[str, Iterator[torch.Tensor]] = {}
    epoch_files: List[str] = []

    def step_fn(i: int) -> Dict[str, float]:
        if "it" not in stream:  # created at the first step this process runs (after a resume: that step)
            # its own generator: the loader's base-seed draw must not shift the global one (LoRA dropout)
            plan = rank_slices(cycle_batches(len(paths), batch, seed, i), dist)
            loader = torch.utils.data.DataLoader(data, batch_sampler=plan,
                                                 num_workers=max(0, int(args.workers)), pin_memory=amp,
                                                 generator=torch.Generator().manual_seed(_seed(seed, 7)))
            stream["it"] = iter(loader)
        images = next(stream["it"]).to(device, non_blocking=True)
        # the step's draws (crop boxes, strip side, detector samples) come from one stream over the rank's images;
        # under torchrun each rank has its own stream, so the run is not the single process's (README, torchrun)
        gen = torch.Generator().manual_seed(_seed(seed, i) if dist.world_size == 1 else _seed(seed, i, dist.rank))
        student.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = step(images, gen, i / total)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        dist.average_gradients(trainable.values())  # DDP: the mean of the ranks' gradients
        optimizer.step()
        done = i + 1
        if done % per_epoch == 0 and dist.is_main:
            epoch_files.append(atomic_save({"state_dict": {k: v.detach().float().cpu().clone()
                                                          for k, v in student.state_dict().items()}},
                                           _epoch_path(args.out, done // per_epoch)))
        return {k: float(v.detach()) for k, v in out.items()}

    t0 = time.time()
    # LoRA dropout draws from the global generator: seed it (a resume restores the checkpoint's state instead),
    # and leave the caller's generator as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(_seed(seed, 5) if dist.world_size == 1 else _seed(seed, 5, dist.rank))  # rank's dropout
        loop.run(step_fn)
    student.eval()
    merged = {k: v.detach().float().cpu().clone() for k, v in student.merge_and_unload().state_dict().items()}
    artifacts = loop.finish(merged, f"UniRefiner, {backbone.spec.id}")
    rows = [(name, v) for _, kind, _, name, v in loop.curves.rows if kind == "train"]
    first = {n: v for n, v in reversed(rows)}
    last = {n: v for n, v in rows}
    from ..results.record import git_hash

    summary = {**settings, "out": os.path.abspath(args.out), "file_layout": "Hugging Face CLIP vision, LoRA merged",
               "epoch_files": epoch_files, "resumed_from_step": loop.resumed_from,
               "first": first, "final": last, "harness_version": __version__, "git": git_hash(),
               "seconds_this_process": round(time.time() - t0, 1), "device": device_description(device),
               **artifacts, "source": "harness distill unirefiner (Qiu et al., Teaching Pre-trained ViTs to "
                                      "Self-Dispose Dross via Contrastive Register, CVPR 2026, arXiv:2605.19622)"}
    if not dist.is_main:  # rank 0 writes the summary and reports
        return 0
    summary["world_size"] = dist.world_size
    with open(args.out + ".json", "w") as fh:
        json.dump(summary, fh, indent=1)
    print(f"refined {backbone.spec.id} for {total} steps; loss {first.get('loss', float('nan')):.4f} -> "
          f"{last.get('loss', float('nan')):.4f}; lazy channels {mask['masked_channels']}; AH layers "
          f"{settings['ah_layers']}")
    print(f"wrote {args.out}  (use: --backbone {backbone.spec.id} --method unirefiner --method-weights {args.out})")
    return 0
