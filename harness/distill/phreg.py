"""``harness distill phreg``: train a PH-Reg student (Chen et al., NeurIPS 2025, arXiv:2505.21501, §3 and
Appendix B) on a folder of unlabelled images; the output loads with ``--method phreg --method-weights OUT``.

The recipe (arXiv:2505.21501 §3 and Appendix B; github.com/0raiser0/PH-Reg @ 5910d50,
``DINOv2_full/distill_main.py``, ``datasets/flickr30k_dataset.py``, ``utils/loss.py``):

* **Teacher** (frozen): the backbone with NACLIP's last block for CLIP (paper B.1; ``set_params(arch, 'naclip',
  5.0)``: ``--method naclip``), the plain backbone for DINOv2, wrapped in PH-Reg's TTA denoiser (``--method
  tta``: 10 views, shifts of up to 15% of the grid, flips with p = 0.5, view 0 the identity). The authors draw
  new views for every image of every step (``Flickr30Dataset.__getitem__`` seeds from ``random``); here the
  TTA wrapper runs once per image with its ``seed`` parameter set from (``--seed``, step, position in the
  batch), so every image gets its own draw and a resumed run draws the same views again.
* **Student**: ``--method phreg`` on a copy of the backbone, 16 registers ``randn(16, D) / sqrt(D)``; the CLIP
  student's positional embedding is interpolated to the training grid once (``StudentCLIP.__init__``).
  Trainable: registers, positional embedding, patch projection and the last two blocks (CLIP,
  ``student_model_initialization``, models/OpenaiMaskCLIP/clip_reg.py @ 1a6f9b8) or the last block (DINOv2,
  ``distill_main.py``); everything else stays frozen.
* **Loss** on the patch tokens (CLS and registers dropped), in fp32: ``(1 - mean cos(t, s)) + 1.0 * MSE(t, s)``
  with ``x / (|x| + 1e-8)`` normalisation (``utils/loss.py``; ``--mse_scale 1.0``).
* **Optimiser**: AdamW (weight decay 1e-2, default betas), one learning rate for every group, decayed per
  epoch as ``lr_e = lr0 * (lr_end / lr0) ** ((e + 1) / epochs)`` floored at ``lr_end``: the first step runs at
  ``lr0``, every later step at the value set after the previous one (``distill_main.py``). DINOv2: lr0 1e-4,
  lr_end 5e-6, batch 8 (``distill_main.py`` defaults = paper Table S.3); CLIP: lr0 3e-4, lr_end 1e-5,
  batch 16 (paper Table S.2); 100 epochs for both. bf16 autocast on CUDA only (``Accelerator(mixed_precision=
  "bf16")``); the weights stay fp32. A batch whose loss is not finite is skipped without an update, as
  ``distill_main.py`` does; ``OUT.json`` lists such steps.
* **Data**: bicubic resize of the short side to the resolution (448 CLIP, 518 DINOv2: paper B.3), a random
  square crop along the long side (``RandomSquareCropPreservingShortEdge``), normalised with the backbone's
  mean/std. Crops are seeded by (``--seed``, step, position); batches are a seeded permutation per epoch
  that drops the last incomplete batch (``drop_last=True``).
* **Checkpoints**: resumable state every ``--checkpoint-every`` steps (``harness.distill.common.DistillLoop``),
  the loss curve as ``OUT.curves.csv`` / ``.png``, a summary ``OUT.json``. With ``--epochs`` (not ``--steps``)
  student snapshots ``OUT-stem.epochN.ext`` are also written after epoch 1 and every 10th, as the authors save
  them (their reported DINOv2 numbers use the epoch-30 snapshot of a 100-epoch run).

**torchrun**: each rank a slice of every global batch (``--batch-size`` is the global batch), the gradients
averaged; the crops and the teacher's view draws are seeded by (step, global slot), so 2 ranks x B/2 train what
1 rank x B trains (up to float rounding), and a non-finite loss on any rank skips the step on all of them.

Output: the CLIP student in ``StudentCLIP``'s ``vit.*`` layout, the DINOv2 student in ``RegDINOv2Base``'s
layout (``harness.methods.phreg``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..backbones.base import Backbone
from ..errors import ConfigError
from ..image_folder import list_images, read_image
from ..methods.base import DenseModel
from ..methods.phreg import NUM_REGISTERS, PHReg, PHRegStudent, student_family
from ..methods.tta import TTADenoiser
from ..models import attach_method, build_dense_model
from ..runtime import device_description, init_distributed, select_device
from .common import DistillLoop, atomic_save, cycle_batches, files_fingerprint, fingerprint, rank_slices

#: per backbone family: teacher method, training resolution, batch, lr0, lr_end (module docstring)
RECIPES: Dict[str, Dict[str, Any]] = {
    # paper Appendix B.1 (NACLIP teacher), B.3 (448 px), Table S.2 (AdamW 3e-4 -> 1e-5, batch 16, 100 epochs)
    "open_clip": {"teacher": "naclip+tta", "resolution": 448, "batch_size": 16, "lr": 3e-4, "end_lr": 1e-5},
    # DINOv2_full/distill_main.py @ 5910d50 defaults (= paper Table S.3): 518 px, batch 8, 1e-4 -> 5e-6
    "timm": {"teacher": "tta", "resolution": 518, "batch_size": 8, "lr": 1e-4, "end_lr": 5e-6},
}
EPOCHS = 100  # --num_epochs default (distill_main.py); paper Tables S.2/S.3
WEIGHT_DECAY = 1e-2  # --weight_decay (distill_main.py); paper Tables S.2/S.3
MSE_SCALE = 1.0  # --mse_scale (distill_main.py)
COS_EPS = 1e-8  # utils/loss.py cosine_similarity_loss: x / (x.norm() + 1e-8)


# -- data -----------------------------------------------------------------------------------------------
def _seed(*parts: int) -> int:
    """A 32-bit seed from integers (numpy SeedSequence: well mixed, stable across runs and processes)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def load_square_crop(path: str, size: int, seed: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Short side -> ``size`` (bicubic, torchvision ``Resize(size)`` arithmetic), random ``size`` square crop along
    the long side (``RandomSquareCropPreservingShortEdge``), normalised: (3, size, size)."""
    from PIL import Image

    def view(im: Any) -> Any:
        w, h = im.size
        if w <= h:  # torchvision: the long side is int(size * long / short)
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        im = im.resize((nw, nh), Image.BICUBIC)
        rng = np.random.default_rng(seed)
        left = int(rng.integers(0, nw - size + 1)) if nw > size else 0
        top = int(rng.integers(0, nh - size + 1)) if nh > size else 0
        return im.crop((left, top, left + size, top + size))

    return read_image(path, view, mean, std)


class _Crops(torch.utils.data.Dataset):
    """Item ``(image index, crop seed)`` -> the seeded crop (so worker processes give the same batches)."""

    def __init__(self, paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.paths, self.size, self.mean, self.std = list(paths), size, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: Tuple[int, int]) -> torch.Tensor:
        idx, seed = item
        return load_square_crop(self.paths[idx], self.size, seed, self.mean, self.std)


def batch_plan(n: int, batch: int, seed: int, start: int) -> Iterator[List[Tuple[int, int]]]:
    """From step ``start`` on: each step's ``[(image index, crop seed), ...]`` (seeds from the global slot, so a
    torchrun rank taking a slice of the batch draws the crops one process draws for those slots)."""
    for step, idx in enumerate(cycle_batches(n, batch, seed, start), start=start):
        yield [(i, _seed(seed, step, slot, 0)) for slot, i in enumerate(idx)]


# -- schedule and loss -------------------------------------------------------------------------------------
def learning_rate(step: int, steps_per_epoch: int, epochs: int, lr: float, end_lr: float) -> float:
    """The lr step ``step`` (0-based) runs at: ``distill_main.py`` sets ``lr0 * ratio ** ((e + 1) / epochs)``
    (floored at ``end_lr``) after each step of epoch ``e``; the first step uses ``lr0``."""
    if step == 0:
        return lr
    epoch = (step - 1) // steps_per_epoch
    return max(end_lr, lr * (end_lr / lr) ** ((epoch + 1) / epochs))


def distill_loss(target: torch.Tensor, student: torch.Tensor, mse_scale: float = MSE_SCALE
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C, h, w) features -> (loss, 1 - mean cos, MSE) in fp32 (``utils/loss.py``)."""
    t = target.float().flatten(2).transpose(1, 2)
    s = student.float().flatten(2).transpose(1, 2)
    cos = ((t / (t.norm(dim=-1, keepdim=True) + COS_EPS)) * (s / (s.norm(dim=-1, keepdim=True) + COS_EPS))).sum(-1)
    cos_loss = 1.0 - cos.mean()
    mse = torch.nn.functional.mse_loss(s, t, reduction="mean")
    return cos_loss + mse_scale * mse, cos_loss, mse


# -- models -----------------------------------------------------------------------------------------------
def build_teacher(backbone: Backbone, family: str) -> Tuple[DenseModel, TTADenoiser]:
    """The frozen teacher and its TTA part (whose ``seed`` the trainer sets per image)."""
    teacher = attach_method(backbone, RECIPES[family]["teacher"])
    tta = next(p for p in teacher.parts if isinstance(p, TTADenoiser))
    return teacher, tta


def build_student(backbone: Backbone, grid: int, seed: int) -> Tuple[DenseModel, PHRegStudent]:
    """The untrained student (``--method phreg`` with the backbone's weights and random registers)."""
    method = PHReg().init_untrained(backbone, grid, seed)
    model = DenseModel(backbone, [method], name="phreg")
    model.method_weights = {}
    model.to(next(backbone.parameters()).device)
    return model.eval(), method.student


@torch.no_grad()
def teacher_targets(teacher: DenseModel, tta: TTADenoiser, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """TTA-denoised teacher features, one view draw per image (``seed`` of the TTA part)."""
    out = []
    for img, seed in zip(images, seeds):
        tta.params["seed"] = int(seed)
        out.append(teacher.forward_dense(img.unsqueeze(0)).patch)
    return torch.cat(out)


class TrainableState:
    """``state_dict`` / ``load_state_dict`` over the unlocked parameters only (what checkpoints need to hold)."""

    def __init__(self, params: Dict[str, nn.Parameter]) -> None:
        self.params = params

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: p.detach().cpu().clone() for k, p in self.params.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state[k].to(p.device))


# -- the command -------------------------------------------------------------------------------------------
def plan_steps(n_images: int, batch: int, steps: Optional[int], epochs: Optional[int]) -> Tuple[int, int, int]:
    """(total steps, steps per epoch, epochs): ``--steps`` wins; the schedule always spans ``epochs``."""
    per_epoch = max(1, n_images // batch)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be >= 1 (got {steps})")
        return steps, per_epoch, max(1, math.ceil(steps / per_epoch))
    epochs = EPOCHS if epochs is None else epochs
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1 (got {epochs})")
    return epochs * per_epoch, per_epoch, epochs


def _snapshot_path(out: str, epoch: int) -> str:
    stem, ext = os.path.splitext(out)
    return f"{stem}.epoch{epoch}{ext or '.pth'}"


def run(args: argparse.Namespace) -> int:
    """``harness distill phreg --backbone ID --images DIR --out FILE``: train, write the student, return 0."""
    if getattr(args, "stage", None) is not None:
        raise ConfigError(f"--stage {args.stage}: stages are for `harness distill dvt`; PH-Reg has one stage")
    dist = init_distributed()
    device = select_device(args.device, dist)
    backbone = build_dense_model(args.backbone, "vanilla", weights=args.weights, random_init=args.random_init,
                                 allow_download=args.download).backbone.to(device)
    family = student_family(backbone)
    recipe = RECIPES[family]
    patch = backbone.spec.patch_size
    res = int(args.resolution or recipe["resolution"])
    if res < patch or res % patch:
        raise ConfigError(f"--resolution {res}: must be a positive multiple of the patch size {patch}")
    batch = int(args.batch_size or recipe["batch_size"])
    if batch < 1:
        raise ConfigError(f"--batch-size must be >= 1 (got {batch})")
    local = dist.per_rank(batch, "--batch-size")  # torchrun: each rank its slice of every global batch
    paths = list_images(args.images, args.num_images)
    total, per_epoch, epochs = plan_steps(len(paths), batch, args.steps, args.epochs)
    seed = int(args.seed)

    teacher, tta = build_teacher(backbone, family)
    model, student = build_student(backbone, res // patch, seed)
    trainable = student.trainable()
    for p in trainable.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=recipe["lr"], weight_decay=WEIGHT_DECAY)
    settings = {"backbone": backbone.spec.id, "weights": backbone.weights_id, "family": family, "resolution": res,
                "batch_size": batch, "steps": total, "steps_per_epoch": per_epoch, "epochs": epochs,
                "lr": recipe["lr"], "end_lr": recipe["end_lr"], "weight_decay": WEIGHT_DECAY,
                "mse_scale": MSE_SCALE, "registers": NUM_REGISTERS, "teacher": recipe["teacher"],
                "tta": {k: v for k, v in tta.params.items() if k != "seed"}, "seed": seed,
                "images": len(paths), "unlocked": sorted(trainable)}
    fp = fingerprint({**settings, "images_fingerprint": files_fingerprint(paths), "version": 1})
    loop = DistillLoop(out=args.out, total_steps=total, fingerprint=fp,
                       modules={"trainable": TrainableState(trainable), "optimizer": optimizer},
                       checkpoint_every=max(1, int(args.checkpoint_every)), show_progress=not args.no_progress,
                       desc=f"distill phreg {backbone.spec.id}", kill_after=getattr(args, "kill_after", None),
                       dist=dist)
    amp = device.type == "cuda"
    data = _Crops(paths, res, backbone.spec.mean, backbone.spec.std)
    stream: Dict[str, Iterator[torch.Tensor]] = {}
    snapshots: List[str] = []
    skipped: List[int] = []

    def step_fn(step: int) -> Dict[str, float]:
        if "it" not in stream:  # created at the first step this process runs (after a resume: that step)
            plan = rank_slices(batch_plan(len(paths), batch, seed, step), dist)
            loader = torch.utils.data.DataLoader(data, batch_sampler=plan,
                                                 num_workers=max(0, int(args.workers)), pin_memory=amp)
            stream["it"] = iter(loader)
        images = next(stream["it"]).to(device, non_blocking=True)
        lr = learning_rate(step, per_epoch, epochs, recipe["lr"], recipe["end_lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            first = dist.rank * local  # the global slot of this rank's first image: its view draws
            target = teacher_targets(teacher, tta, images,
                                     [_seed(seed, step, first + k, 1) for k in range(len(images))])
            feats = model.forward_dense(images).patch
        loss, cos_loss, mse = distill_loss(target, feats)
        optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if dist.world_size > 1:  # one process skips a batch with any non-finite loss: all ranks skip it together
            finite = dist.total([float(not finite)])[0] == 0
        if finite:
            loss.backward()
            # DDP: the mean of the ranks' gradients = the gradient of the global batch's mean loss
            dist.average_gradients(trainable.values())
            optimizer.step()
        else:  # distill_main.py skips a batch whose features or loss are NaN/Inf ("Skipping batch")
            skipped.append(step)
        done = step + 1
        if args.steps is None and done % per_epoch == 0 and done < total and dist.is_main:
            epoch = done // per_epoch
            if epoch == 1 or epoch % 10 == 0:  # distill_main.py: `(epoch+1) % 10 == 0 or epoch == 0`
                snapshots.append(atomic_save(student.authors_state_dict(), _snapshot_path(args.out, epoch)))
        return {"loss": loss.item(), "cos_loss": cos_loss.item(), "mse": mse.item(), "lr": lr}

    t0 = time.time()
    loop.run(step_fn)
    artifacts = loop.finish(student.authors_state_dict(), f"PH-Reg distillation, {backbone.spec.id}")
    losses = [v for _, kind, _, name, v in loop.curves.rows if kind == "train" and name == "loss"]
    summary = {**settings, "out": os.path.abspath(args.out), "resumed_from_step": loop.resumed_from,
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "seconds_this_process": round(time.time() - t0, 1), "device": device_description(device),
               "snapshots": snapshots, "skipped_steps_this_process": skipped, **artifacts,
               "source": "harness distill phreg (Chen et al., Vision Transformers with Self-Distilled Registers, "
                         "NeurIPS 2025, arXiv:2505.21501)"}
    if not dist.is_main:  # rank 0 writes the summary and reports
        return 0
    summary["world_size"] = dist.world_size
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"distilled {backbone.spec.id} for {total} steps ({epochs} epochs of {per_epoch}); loss "
          f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")
    if skipped:
        print(f"warning: {len(skipped)} step(s) had a non-finite loss and were skipped (first: step {skipped[0]})")
    print(f"wrote {args.out}  (use: --backbone {backbone.spec.id} --method phreg --method-weights {args.out})")
    return 0
