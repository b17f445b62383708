"""Linear-probe semantic segmentation (task ``linear-seg``): BN + 1x1 conv on frozen last-layer patch features.

Protocols (``harness/protocols/linear-seg/*.yaml``):

* ``faithful`` -- the DINOv2/DVT "lin." recipe (DVT@82704df vitb_*_linear_config.py): mmseg's RandomResize
  (0.5-2.0), RandomCrop 512 (cat_max_ratio 0.75), RandomFlip, PhotoMetricDistortion every iteration,
  centre padding to the patch multiple (518 for /14), AdamW 1e-3 / wd 1e-4, poly with 1.5k linear
  warm-up, 40k iterations at global batch 16, sliding-window test 512/341, mmseg IoUMetric semantics.
* ``fast`` -- one fixed view per image cached in fp16, a learning-rate grid of heads trained together,
  the best kept on a held-out part of train, sliding-window test as faithful; its records say ``fast``.
  Version 2 (``train_loss: token``) computes the training loss on the token grid against each token's
  label histogram (``probes/targets.py``), derived once from the cached labels; version 1 (``pixel``)
  upsampled every head's logits to the 512x512 label. Held-out selection and test stay at full resolution.

The probe sees ``DenseFeatures.patch`` from the chosen method, so cleaned and uncleaned features of any
backbone (DINOv2, CLIP with MaskCLIP's value path, ...) are probed the same way.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ..errors import ConfigError, DataError
from ..io_safety import atomic_torch_save
from ..metrics.segmentation import IoUAccumulator
from ..probes.cache import FeatureCache
from ..probes.common import lr_name, seeded
from ..probes.data import (
    IGNORE_INDEX,
    AugmentedSamples,
    IterationBatches,
    collate,
    seg_fixed_view_pipeline,
    seg_test_pipeline,
    seg_train_pipeline,
)
from ..probes.extract import FixedViewSamples, fill_cache
from ..probes.features import dense_features, padded_grid, resize, slide_logits, slide_windows
from ..probes.heads import HeadBank, LinearSegHead, centre_batch, seg_grid_train_logits
from ..probes.targets import FP16_EXACT_INT, derive_cache, label_counts, token_seg_losses
from ..registry import EVALUATORS
from ..results.record import RunRecord
from .probe_base import ProbeEvaluator, ProbeRun

TASK = "linear-seg"
COMMON_KEYS = ("train_split", "test_scale", "optimizer", "schedule", "max_iters", "batch_size", "eval_interval",
               "checkpoint_interval", "log_interval", "head")
FAITHFUL_KEYS = ("train_scale", "ratio_range", "crop_size", "cat_max_ratio", "flip_prob", "slide_crop", "slide_stride")
FAST_KEYS = ("crop_size", "slide_crop", "slide_stride", "holdout_fraction", "select_metric")


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, ignore 255, averaged over *all* label pixels.

    mmseg ``cross_entropy`` with ``avg_non_ignore=False`` (its default, used by the DINOv2/DVT configs)
    divides the summed loss by ``label.numel()``, ignored pixels included (mmseg losses/cross_entropy_loss.py).
    Logits are bilinearly resized to the label size first (mmseg ``BaseDecodeHead.loss_by_feat``).
    """
    logits = resize(logits, tuple(target.shape[-2:]))
    loss = F.cross_entropy(logits, target, reduction="none", ignore_index=IGNORE_INDEX)
    return loss.sum() / target.numel()


@EVALUATORS.register(TASK)
class LinearSegEvaluator(ProbeEvaluator):
    """Linear segmentation probe on frozen dense features (``faithful`` DINOv2/DVT recipe or ``fast`` cached)."""

    task = TASK
    optimiser_source = "the DINOv2/DVT probe optimiser"
    common_keys, faithful_keys, fast_keys = COMMON_KEYS, FAITHFUL_KEYS, FAST_KEYS
    #: pixel: v1, logits bilinearly upsampled to the label, per-pixel cross-entropy; token: v2, cross-entropy
    #: of the token-grid logits against per-token label histograms
    fast_train_losses = ("pixel", "token")
    ddp_modes = ("fast", "faithful")

    def _check_dataset(self, run: ProbeRun, spec: Any) -> None:
        if spec.num_classes < 1 or spec.num_classes >= IGNORE_INDEX:
            raise ConfigError(f"dataset {run.dataset!r} is not a segmentation dataset with < 255 classes")

    # -- shared ----------------------------------------------------------------------------------
    def _val_dataset(self, run: ProbeRun, spec: Any):
        return run.build(spec, run.eval_split, seg_test_pipeline(run.settings["test_scale"]))

    def _record(self, run: ProbeRun, spec: Any, acc: IoUAccumulator, n_images: int,
                extra: Dict[str, Any]) -> RunRecord:
        m = acc.compute()
        names = spec.class_names
        per_class = {c: {"IoU": iou, "Acc": a} for c, iou, a in zip(names, m["IoU"], m["Acc"])}
        run.notes.append("metrics x100; IoU accumulated over the split, mIoU = nanmean over classes (mmseg IoUMetric)")
        return run.finish({"mIoU": m["mIoU"], "mAcc": m["mAcc"], "aAcc": m["aAcc"]}, n_images, extra, per_class)

    def _token_targets(self, run: ProbeRun, spec: Any, tr_cache: FeatureCache) -> FeatureCache:
        """Per-token label counts of every cached training view, derived once into a sibling cache; stored
        token-major (h, w, K), the layout of the v2 step's logits."""
        grid = tuple(tr_cache.shape(0, "patch")[1:])
        label_hw = tr_cache.shape(0, "label")
        # the most label pixels one token can cover: fp16 stores such counts exactly up to 2048
        most = -(-int(label_hw[0]) // int(grid[0])) * -(-int(label_hw[1]) // int(grid[1]))
        dtype = "float16" if most <= FP16_EXACT_INT else "float32"
        tg = run.derived_cache(tr_cache, "token-label-counts", {"grid": list(grid), "num_classes": spec.num_classes,
                                                               "ignore_index": IGNORE_INDEX, "layout": "hwk"},
                               {"counts": dtype})

        def item(i: int) -> Dict[str, np.ndarray]:
            if tuple(tr_cache.shape(i, "patch")[1:]) != grid or tuple(tr_cache.shape(i, "label")) != tuple(label_hw):
                raise DataError(f"cached training view {i} of {tr_cache.path} has another token grid or label size "
                                f"than the first; delete the cache directory to rebuild it")
            counts = label_counts(np.asarray(tr_cache.get(i, "label")), grid, spec.num_classes, IGNORE_INDEX)
            return {"counts": counts.transpose(1, 2, 0)}

        desc = f"targets {run.dataset}/{run.settings['train_split']}"
        return derive_cache(tr_cache, tg, item, run.cfg.progress, desc)

    # -- faithful --------------------------------------------------------------------------------
    def _faithful(self, run: ProbeRun, spec: Any, train_split: str) -> RunRecord:
        s, cfg, model, dev = run.settings, run.cfg, run.model, run.device
        lrs, _, _, _ = self._optim(run)
        if len(lrs) != 1:
            raise ConfigError(f"protocol {run.where}: the faithful recipe trains one head (optimizer.lr)")
        crop = (int(s["crop_size"][0]), int(s["crop_size"][1]))
        aug = dict(scale=s["train_scale"], ratio_range=s["ratio_range"],
                   crop_size=crop, cat_max_ratio=s["cat_max_ratio"], flip_prob=s["flip_prob"],
                   photometric=s["photometric"])
        train_ds = run.build(spec, train_split, seg_train_pipeline(aug))
        val_ds = self._val_dataset(run, spec)
        feat_dim = int(model.forward_dense(torch.zeros(1, 3, model.spec.patch_size, model.spec.patch_size,
                                                       device=dev)).patch.shape[1])
        with seeded(cfg.seed):
            head = LinearSegHead(feat_dim, spec.num_classes, float(s["head"]["conv_init_std"])).to(dev)
        heads = HeadBank([head])
        names = [lr_name(lrs[0])]
        trainer = self._trainer(run, heads, names, lrs, {"mode": "faithful"}, f"{TASK} {run.dataset}")
        samples = AugmentedSamples(train_ds, cfg.seed, model.spec.mean_255, model.spec.std_255, "seg", pad_to=crop)
        batch = int(s["batch_size"])

        def batches(start: int):
            sampler = IterationBatches(len(train_ds), batch, start, int(s["max_iters"]), cfg.seed, run.dist)
            return DataLoader(samples, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
                              pin_memory=dev.type == "cuda", persistent_workers=False)

        def prepare(b: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
            feats = dense_features(model, b["img"].to(dev, non_blocking=True), s["precision"])
            return feats.patch.float(), b["target"].to(dev, non_blocking=True)

        def loss_fn(inputs: Tuple[torch.Tensor, torch.Tensor], it: int, j: int) -> torch.Tensor:
            return seg_loss(heads.heads[j](inputs[0]), inputs[1])

        last: Dict[str, Any] = {}

        def eval_fn(it: int) -> Dict[str, Dict[str, float]]:
            acc = self._slide_eval(run, spec, val_ds, head)
            last.update(acc=acc, it=it)
            return {names[0]: {"mIoU": acc.compute()["mIoU"]}}

        trainer.fit(batches, loss_fn, eval_fn, int(s["eval_interval"]), prepare=prepare)
        acc = last["acc"] if last.get("it") == int(s["max_iters"]) else self._slide_eval(run, spec, val_ds, head)
        if run.dist.is_main:
            atomic_torch_save({"head": head.state_dict(), "in_channels": feat_dim, "num_classes": spec.num_classes},
                              run.artifact("head.pt"), "probe head")
        artifacts = {**self._write_curves(run, trainer), "head": run.artifact("head.pt")}
        grid = padded_grid(crop, model.spec.patch_size)
        extra = {"train_images": len(train_ds), "token_grid_train": list(grid), "feature_dim": feat_dim,
                 "resumed_from_iter": trainer.resumed_from, "artifacts": artifacts,
                 "inference_batch": run.inference_batch(16, 4)}
        run.notes.append("faithful: DINOv2/DVT lin. recipe, online features with mmseg augmentation every iteration; "
                         + ("single process" if run.dist.world_size == 1 else
                            f"global batch split over {run.dist.world_size} torchrun processes")
                         + ", BatchNorm over the whole global batch (= SyncBN over 8x2)")
        return self._record(run, spec, acc, len(val_ds), extra)

    def _slide_eval(self, run: ProbeRun, spec: Any, val_ds: Any, head: LinearSegHead) -> IoUAccumulator:
        """mmseg ``slide`` inference at the test scale, logits resized to the label size, IoUMetric areas."""
        s, model, dev = run.settings, run.model, run.device
        crop = (int(s["slide_crop"][0]), int(s["slide_crop"][1]))
        stride = (int(s["slide_stride"][0]), int(s["slide_stride"][1]))
        samples = FixedViewSamples(val_ds, "seg", model.spec.mean_255, model.spec.std_255)
        mine = Subset(samples, run.dist.shard(range(len(samples))))  # torchrun: every rank its share of the images
        loader = DataLoader(mine, batch_size=None, num_workers=run.cfg.num_workers, persistent_workers=False)
        acc = IoUAccumulator(spec.num_classes, IGNORE_INDEX)
        bs = run.inference_batch(16, 4)
        was_training = head.training
        head.eval()

        def logits_fn(windows: torch.Tensor) -> torch.Tensor:
            feats = dense_features(model, windows, s["precision"])
            return resize(head(feats.patch.float()), tuple(windows.shape[-2:]))

        with torch.no_grad():
            for smp in loader:
                label = smp["target"]
                spec.check_label_values(smp["ann_path"], label.numpy())
                img = smp["img"][None].to(dev)
                logits = slide_logits(logits_fn, img, spec.num_classes, crop, stride, bs)
                pred = resize(logits, tuple(label.shape)).argmax(1)[0]
                acc.update(pred.cpu(), label)
        acc.all_reduce()  # the areas of all ranks (a no-op in one process)
        head.train(was_training)
        return acc

    # -- fast ------------------------------------------------------------------------------------
    def _fast(self, run: ProbeRun, spec: Any, train_split: str) -> RunRecord:
        s, cfg, model, dev = run.settings, run.cfg, run.model, run.device
        lrs, _, _, _ = self._optim(run)
        crop = (int(s["crop_size"][0]), int(s["crop_size"][1]))
        scale = [int(x) for x in s["test_scale"]]
        bs = run.inference_batch(32, 8)
        mean, std = model.spec.mean_255, model.spec.std_255

        def featurize(imgs: torch.Tensor) -> Dict[str, torch.Tensor]:
            return {"patch": dense_features(model, imgs.to(dev), s["precision"]).patch}

        # train view: keep-ratio resize to the test scale + centre crop (labels follow), padded to the crop
        train_ds = run.build(spec, train_split, seg_fixed_view_pipeline(scale, crop))
        view = f"fixed-{scale[0]}x{scale[1]}-crop{crop[0]}x{crop[1]}"
        tr_cache = run.open_cache(train_split, view, train_ds, {}, {"patch": "float16", "label": "uint8"})

        def train_fields(smp: Dict[str, Any]) -> Dict[str, np.ndarray]:
            label = smp["target"].numpy()
            spec.check_label_values(smp["ann_path"], label)
            return {"label": label.astype(np.uint8)}

        fill_cache(tr_cache, FixedViewSamples(train_ds, "seg", mean, std, pad_to=crop), featurize, train_fields, bs,
                   cfg.num_workers, cfg.progress, f"cache {run.dataset}/{train_split}", dist=run.dist)
        # eval view: the test resize, sliding windows as in faithful (same token grid as the training crops)
        val_ds = self._val_dataset(run, spec)
        win = (int(s["slide_crop"][0]), int(s["slide_crop"][1]))
        stride = (int(s["slide_stride"][0]), int(s["slide_stride"][1]))
        vview = f"slide-{scale[0]}x{scale[1]}-{win[0]}x{win[1]}-{stride[0]}x{stride[1]}"

        def featurize_windows(imgs: torch.Tensor) -> Dict[str, torch.Tensor]:
            boxes = slide_windows(imgs.shape[-2], imgs.shape[-1], win, stride)
            out = []
            for img in imgs:
                windows = torch.stack([img[:, y1:y2, x1:x2] for (y1, y2, x1, x2) in boxes])
                out.append(torch.cat([dense_features(model, windows[k:k + bs].to(dev), s["precision"]).patch
                                      for k in range(0, len(boxes), bs)]))
            return {"patch": torch.stack(out)}

        va_cache = run.open_cache(run.eval_split, vview, val_ds, {},
                                  {"patch": "float16", "label": "uint8", "img_hw": "int32"})

        def eval_fields(smp: Dict[str, Any]) -> Dict[str, np.ndarray]:
            label = smp["target"].numpy()
            spec.check_label_values(smp["ann_path"], label)
            return {"label": label.astype(np.uint8), "img_hw": smp["img_hw"].numpy()}

        fill_cache(va_cache, FixedViewSamples(val_ds, "seg", mean, std), featurize_windows, eval_fields, 1,
                   cfg.num_workers, cfg.progress, f"cache {run.dataset}/{run.eval_split}", dist=run.dist)
        last: Dict[str, Any] = {}

        n = len(tr_cache)
        n_hold = int(round(float(s["holdout_fraction"]) * n))
        if n < 2 or n_hold < 1 or n_hold >= n:
            raise DataError(f"{n} training images cannot be split into train and a held-out "
                            f"{s['holdout_fraction']} fraction; use more images (or a larger --limit)")
        perm = np.random.default_rng([cfg.seed, 1]).permutation(n)
        hold_idx, fit_idx = sorted(perm[:n_hold].tolist()), perm[n_hold:].tolist()
        feat_dim = int(tr_cache.shape(0, "patch")[0])
        train_loss = self._train_loss(run)
        tg_cache = self._token_targets(run, spec, tr_cache) if train_loss == "token" else None
        with seeded(cfg.seed):
            heads = HeadBank([LinearSegHead(feat_dim, spec.num_classes, float(s["head"]["conv_init_std"]))
                              for _ in lrs]).to(dev)
        names = [lr_name(lr) for lr in lrs]
        fp = {"mode": "fast", "cache": tr_cache.path, "train_loss": train_loss,
              **({"targets": tg_cache.path} if tg_cache is not None else {})}
        trainer = self._trainer(run, heads, names, lrs, fp, f"{TASK} fast {run.dataset}")
        batch = int(s["batch_size"])

        def batches(start: int):
            sampler = IterationBatches(len(fit_idx), batch, start, int(s["max_iters"]), cfg.seed)
            for items in sampler:
                if tg_cache is not None:
                    # v2: every rank trains on the whole global batch -- the heads cost milliseconds and the folded
                    # BatchNorm of the v2 step then sees the global batch, so the run equals one process exactly
                    idx = [fit_idx[k] for (_, _, k) in items]
                    counts = tg_cache.stack(idx, "counts", torch.float32).to(dev)  # (B, h, w, K)
                    yield (centre_batch(tr_cache.stack_channels_first(idx, "patch").to(dev)),
                           counts.reshape(-1, counts.shape[-1]))
                else:  # v1: this rank's slice of the global batch (all of it in one process)
                    idx = [fit_idx[k] for (_, _, k) in run.dist.shard_batch(items)]
                    yield (tr_cache.stack(idx, "patch", torch.float32).to(dev),
                           tr_cache.stack(idx, "label", torch.int64).to(dev))

        def loss_fn(b: Tuple[torch.Tensor, torch.Tensor], it: int, j: int) -> torch.Tensor:
            feats, target = b
            return seg_loss(heads.heads[j](feats), target)

        label_hw = tr_cache.shape(0, "label")
        pixels_per_image = int(label_hw[0]) * int(label_hw[1])

        def token_losses(b: Tuple[Any, torch.Tensor], it: int) -> List[torch.Tensor]:
            feats, counts = b
            n_pixels = feats.shape[0] * pixels_per_image  # ignored pixels count, as in seg_loss
            return list(token_seg_losses(seg_grid_train_logits(heads.heads, feats), counts, n_pixels))

        def eval_fn(it: int) -> Dict[str, Dict[str, float]]:
            accs = [IoUAccumulator(spec.num_classes, IGNORE_INDEX) for _ in heads.heads]
            chunk = min(bs, 8)  # full-resolution logits of one head at a time: 8 x K x 512 x 512 floats at most
            with torch.no_grad():
                for k in range(0, len(hold_idx), chunk):
                    idx = hold_idx[k:k + chunk]
                    feats = tr_cache.stack(idx, "patch", torch.float32).to(dev)
                    labels = tr_cache.stack(idx, "label", torch.int64)
                    for acc, head_j in zip(accs, heads.heads):
                        acc.update(resize(head_j(feats), tuple(labels.shape[-2:])).argmax(1).cpu(), labels)
            out = {nm: {str(s["select_metric"]): a.compute()[str(s["select_metric"])]} for nm, a in zip(names, accs)}
            last.update(it=it, scores=out)
            return out

        if tg_cache is not None:
            trainer.fit(batches, None, eval_fn, int(s["eval_interval"]), losses_fn=token_losses)
        else:
            trainer.fit(batches, loss_fn, eval_fn, int(s["eval_interval"]))
        final = last["scores"] if last.get("it") == int(s["max_iters"]) else eval_fn(int(s["max_iters"]))
        metric = str(s["select_metric"])
        scores = [final[nm][metric] for nm in names]
        best = int(np.nanargmax(np.asarray(scores, dtype=np.float64)))
        head = heads.heads[best].eval()
        acc = IoUAccumulator(spec.num_classes, IGNORE_INDEX)
        with torch.no_grad():
            for i in range(len(va_cache)):
                windows = torch.from_numpy(np.asarray(va_cache.get(i, "patch"), dtype=np.float32)).to(dev)
                label = torch.from_numpy(np.asarray(va_cache.get(i, "label")).astype(np.int64))
                h, w = (int(x) for x in va_cache.get(i, "img_hw"))
                logits = torch.zeros(1, spec.num_classes, h, w, device=dev)
                count = torch.zeros(1, 1, h, w, device=dev)
                for (y1, y2, x1, x2), f in zip(slide_windows(h, w, win, stride), windows):
                    logits[:, :, y1:y2, x1:x2] += resize(head(f[None]), (y2 - y1, x2 - x1))
                    count[:, :, y1:y2, x1:x2] += 1
                pred = resize(logits / count, tuple(label.shape)).argmax(1)[0]  # mmseg: resize to ori, argmax
                acc.update(pred.cpu(), label)
        if run.dist.is_main:
            atomic_torch_save({"head": head.state_dict(), "in_channels": feat_dim, "num_classes": spec.num_classes,
                               "lr": lrs[best]}, run.artifact("head.pt"), "probe head")
        artifacts = {**self._write_curves(run, trainer), "head": run.artifact("head.pt"),
                     "train_cache": tr_cache.path, "eval_cache": va_cache.path}
        extra = {"selected_lr": lrs[best], "heldout": {nm: final[nm][metric] for nm in names},
                 "heldout_images": n_hold, "fit_images": n - n_hold, "feature_dim": feat_dim,
                 "token_grid_train": list(tr_cache.shape(0, "patch")[1:]),
                 "cache_bytes_per_image": {"train": tr_cache.field_nbytes(["patch"]) / max(1, n),
                                           "eval (all windows)": va_cache.field_nbytes(["patch"])
                                           / max(1, len(va_cache))},
                 "resumed_from_iter": trainer.resumed_from, "artifacts": artifacts, "inference_batch": bs,
                 "train_loss": train_loss, "train_seconds": trainer.train_seconds}
        if tg_cache is not None:
            artifacts["train_targets_cache"] = tg_cache.path
            extra["cache_bytes_per_image"]["train targets"] = tg_cache.nbytes / max(1, n)
        loss_note = ("training loss on the token grid against per-token label histograms (not the full-resolution "
                     "loss of faithful)" if train_loss == "token" else "training loss at the label resolution")
        run.notes.append("fast protocol (not faithful): one fixed view per image, features cached in fp16, "
                         f"{len(lrs)} heads (lr grid) trained together, {loss_note}, best by held-out {metric} on "
                         f"{n_hold} train images; sliding-window test at the test scale as in faithful")
        return self._record(run, spec, acc, len(va_cache), extra)
