"""Linear-probe monocular depth on NYUv2 (task ``depth``), AdaBins style, as DINOv2 "lin. 1" / DVT.

Head (DVT@82704df vitb_nyu_linear_config.py): last-layer final-norm patch features of the chosen method
concatenated with the broadcast CLS token, x4 bilinear upsampling, 1x1 conv to 256 bins uniform on
[0.001, 10] m, p = (ReLU(z) + 0.1) / sum, depth = sum p·bins, resized to the input size. Loss: SigLoss
(lambda 0.85, warm-up 100 iterations) + 0.5 x a *spatial* multi-scale gradient loss (``probes/losses.py``).
Test: the 654 official frames at 480x640, prediction averaged with the un-flipped prediction of the
flipped frame, Eigen crop, 0.001 < d < 10; metrics per image, averaged over images.

Protocols: ``faithful`` (DVT's NYU recipe: NYUCrop, rotation, flip, random crop 416x544, colour
augmentation; AdamW 5e-3, wd 0.01, grad clip 35, cosine with 12.8k warm-up and one-cycle momentum,
38.4k iterations at batch 16) and ``fast`` (cached fixed views, a learning-rate grid, best head on a
held-out part of train by ``abs_rel``). ``fast`` version 3 (``train_loss: token``) computes the training
loss at the token grid: the heads without their x4 upsampling, all heads' logits from one product over the
shared token matrix (``probes/heads.py`` ``depth_token_grid_train``), against the valid-masked mean of the
depth pixels each token covers, derived once per cached view (``probes/targets.py``); version 2
(``head-output``) did the same at the head's output resolution (4x the token grid) and version 1 (``pixel``)
resized the prediction to the 416x544 view. Version 4 (the shipped one) keeps version 3's loss and computes
it, each step, on a random window of 70% of each view's token rows and columns (``train_token_window``; 21x27
of 30x39, about half the tokens and so half the products), the offsets seeded by iteration and batch slot.
Held-out selection and test stay at full resolution.

The NYU training crop (``nyu_crop_box``), the Eigen test crop (``eigen_crop_box``) and the one-cycle momentum
(``onecycle_momentum``) are protocol keys too; the code constants they replace are only the defaults of the
functions (``probes/data.py``, ``metrics/depth.py``, ``probes/schedules.py``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..errors import ConfigError, DataError
from ..io_safety import atomic_torch_save
from ..metrics.depth import DEPTH_METRICS, LOWER_IS_BETTER, DepthAccumulator
from ..probes.cache import FeatureCache
from ..probes.common import lr_name, seeded
from ..probes.data import (
    NYU_TRAIN_CROP,
    AugmentedSamples,
    IterationBatches,
    collate,
    depth_fixed_view_pipeline,
    depth_test_pipeline,
    depth_train_pipeline,
    random_windows,
    window_size,
)
from ..probes.extract import FixedViewSamples, fill_cache
from ..probes.features import dense_features, depth_flip_average, depth_from_features, resize
from ..probes.heads import (
    DepthBinsHead,
    HeadBank,
    depth_head_input,
    depth_head_split_forward,
    depth_token_grid_train,
)
from ..probes.losses import RankSum, depth_loss, depth_losses
from ..probes.targets import derive_cache, masked_mean_pool
from ..probes.trainer import ProbeTrainer
from ..registry import EVALUATORS
from ..results.record import RunRecord
from .probe_base import ProbeEvaluator, ProbeRun

TASK = "depth"
COMMON_KEYS = ("train_split", "depth_rescale_factor", "min_depth", "max_depth", "eigen_crop", "flip_test",
               "crop_size", "optimizer", "schedule", "max_iters", "batch_size", "eval_interval",
               "checkpoint_interval", "log_interval", "n_bins", "upsample", "sigloss_warmup_iters", "loss", "head",
               "nyu_crop_box", "eigen_crop_box", "onecycle_momentum")
FAITHFUL_KEYS = ("rotate_prob", "rotate_degree", "flip_prob", "color_prob", "gamma_range", "brightness_range",
                 "color_range")
FAST_KEYS = ("holdout_fraction", "select_metric")
#: what a ``fast`` record's note says of each training loss (``train_loss``: v1 pixel, v2 head-output, v3 and v4
#: token; v4 adds ``train_token_window``, see :func:`token_window_note`)
FAST_LOSS_NOTES = {
    "pixel": "training loss at the depth map's resolution",
    "head-output": ("training loss at the head's output resolution against the valid-masked mean depth of each "
                    "output cell (not the full-resolution loss of faithful)"),
    "token": ("training loss at the token grid (the heads without their x4 upsampling) against the valid-masked "
              "mean depth of each token's pixels (not the full-resolution loss of faithful)"),
}
#: record metric names: the toolbox's a1/a2/a3 are called delta1..3 here (issue: leaderboard names)
RECORD_METRICS = ("rmse", "abs_rel", "sq_rel", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3")
#: recorded in percent, as PH-Reg Table 2 and the DVT tables print them (so the leaderboard's Δ is meaningful)
PERCENT_METRICS = ("delta1", "delta2", "delta3")


def token_window_note(grid: Tuple[int, int], window: Tuple[int, int]) -> str:
    """The record note's words for the version-4 window (empty for the whole grid, version 3)."""
    if tuple(window) == tuple(grid):
        return ""
    return (f" on a random {window[0]}x{window[1]} window of each view's {grid[0]}x{grid[1]} token grid per "
            f"step (seeded by iteration and batch slot)")


def record_metrics(m: Dict[str, float]) -> Dict[str, float]:
    """Accumulator output -> record metrics (deltas as percentages)."""
    return {k: m[k] * 100.0 if k in PERCENT_METRICS else m[k] for k in RECORD_METRICS}


def rank_sum(run: ProbeRun) -> Optional[RankSum]:
    """Under torchrun: the differentiable sum over ranks that makes the depth loss the global batch's (SigLoss
    and the gradient loss are not means of per-image terms, so a per-rank loss would change the numbers)."""
    return run.dist.differentiable_sum if run.dist.world_size > 1 else None


def mean_valid_depth(cache: FeatureCache, indices: List[int], scale: float) -> float:
    """Mean valid (> 0) depth in metres over the cached ``depth`` maps ``indices``, one map in memory at a time.

    Why streaming: the fit views of the BTS train split hold ~4e9 valid pixels; concatenating them (as
    float64, twice) needs tens of GB.
    """
    total, count = 0.0, 0
    for i in indices:
        d = np.asarray(cache.get(i, "depth"))
        v = d[d > 0]
        total += float(v.sum(dtype=np.float64))
        count += int(v.size)
    return total * float(scale) / count if count else float("nan")


@EVALUATORS.register(TASK)
class DepthEvaluator(ProbeEvaluator):
    """NYUv2 linear depth probe (AdaBins-style bins head; ``faithful`` DVT recipe or ``fast`` cached)."""

    task = TASK
    optimiser_source = "DVT's NYU probe optimiser"
    #: pixel: v1, prediction resized to the depth map; head-output: v2, loss at the head's output resolution
    #: against the valid-masked mean depth of each output cell; token: v3, the heads' depth at the token grid
    #: (no upsampling) against the valid-masked mean depth of each token's pixels (the first is the default)
    fast_train_losses = tuple(FAST_LOSS_NOTES)
    default_eval_split = "test"
    common_keys, faithful_keys, fast_keys = COMMON_KEYS, FAITHFUL_KEYS, FAST_KEYS
    ddp_modes = ("fast", "faithful")

    def _check_dataset(self, run: ProbeRun, spec: Any) -> None:
        if spec.num_classes != 0 or spec.mmseg_type != "NYUDataset":
            raise ConfigError(f"the depth probe needs a depth dataset (nyu); {run.dataset!r} is not one")
        if run.mode == "fast" and str(run.settings["select_metric"]) not in DEPTH_METRICS:
            raise ConfigError(f"protocol {run.where}: select_metric must be one of {', '.join(DEPTH_METRICS)}")

    # -- shared ----------------------------------------------------------------------------------
    def _head(self, run: ProbeRun, in_channels: int) -> DepthBinsHead:
        s = run.settings
        return DepthBinsHead(in_channels, int(s["n_bins"]), float(s["min_depth"]), float(s["max_depth"]),
                             int(s["upsample"]), norm_eps=float(s["head"]["norm_eps"]))

    def _accumulator(self, run: ProbeRun, eigen: bool) -> DepthAccumulator:
        s = run.settings
        return DepthAccumulator(float(s["min_depth"]), float(s["max_depth"]), eigen_crop=eigen,
                                eigen_crop_box=tuple(int(v) for v in s["eigen_crop_box"]))

    def _finish(self, run: ProbeRun, trainer: ProbeTrainer, acc: DepthAccumulator,
                extra: Dict[str, Any]) -> RunRecord:
        extra = dict(extra)
        extra.setdefault("artifacts", {}).update(self._write_curves(run, trainer))
        loss = run.settings["loss"]
        extra.update(loss={**loss, "sigloss_lambda": 1 - loss["sigloss_mean_weight"], "gradient_loss": "spatial"},
                     metric_aggregation="per image, then mean over images (toolbox / DVT)",
                     resumed_from_iter=trainer.resumed_from)
        m = acc.compute()
        run.notes.append("depth metrics computed per image and averaged over images (toolbox/DVT); rmse, sq_rel in "
                         "metres, delta1-3 in percent, silog x100; Eigen crop, 0.001 < d < 10 m")
        return run.finish(record_metrics(m), len(acc), extra)

    def _output_targets(self, run: ProbeRun, tr_cache: FeatureCache, up: int) -> FeatureCache:
        """Depth (metres) of every cached training view pooled onto ``up`` x the token grid (valid-masked mean),
        derived once into a sibling cache: the head's output grid for v2 (``up`` = the head's upsampling), the
        token grid itself for v3 (``up`` = 1)."""
        grid = tuple(tr_cache.shape(0, "patch")[1:])
        out = (int(grid[0]) * up, int(grid[1]) * up)
        scale = float(run.settings["depth_rescale_factor"])
        tg = run.derived_cache(tr_cache, "masked-mean-depth", {"grid": list(out), "depth_rescale_factor": scale},
                               {"depth": "float32"})

        def item(i: int) -> Dict[str, np.ndarray]:
            if tuple(tr_cache.shape(i, "patch")[1:]) != grid:
                raise DataError(f"cached training view {i} of {tr_cache.path} has another token grid than the "
                                f"first; delete the cache directory to rebuild it")
            return {"depth": masked_mean_pool(np.asarray(tr_cache.get(i, "depth"), dtype=np.float64) * scale, out)}

        desc = f"targets {run.dataset}/{run.settings['train_split']}"
        return derive_cache(tr_cache, tg, item, run.cfg.progress, desc)

    # -- faithful --------------------------------------------------------------------------------
    def _faithful(self, run: ProbeRun, spec: Any, train_split: str) -> RunRecord:
        s, cfg, model, dev = run.settings, run.cfg, run.model, run.device
        lrs, _, _, _ = self._optim(run)
        if len(lrs) != 1:
            raise ConfigError(f"protocol {run.where}: the faithful recipe trains one head (optimizer.lr)")
        crop = (int(s["crop_size"][0]), int(s["crop_size"][1]))
        aug = {k: s[k] for k in FAITHFUL_KEYS}
        aug.update(depth_rescale_factor=s["depth_rescale_factor"], crop_size=crop, nyu_crop_box=s["nyu_crop_box"])
        train_ds = run.build(spec, train_split, depth_train_pipeline(aug))
        test_ds = run.build(spec, run.eval_split, depth_test_pipeline(s["depth_rescale_factor"]))
        probe = dense_features(model, torch.zeros(1, 3, model.spec.patch_size, model.spec.patch_size, device=dev),
                               s["precision"])
        in_ch = int(probe.patch.shape[1] + probe.cls.shape[1])
        with seeded(cfg.seed):
            head = self._head(run, in_ch).to(dev)
        heads = HeadBank([head])
        names = [lr_name(lrs[0])]
        trainer = self._trainer(run, heads, names, lrs, {"mode": "faithful"}, f"{TASK} {run.dataset}")
        samples = AugmentedSamples(train_ds, cfg.seed, model.spec.mean_255, model.spec.std_255, "depth", pad_to=crop)
        batch = int(s["batch_size"])
        warm = int(s["sigloss_warmup_iters"])

        def batches(start: int):
            sampler = IterationBatches(len(train_ds), batch, start, int(s["max_iters"]), cfg.seed, run.dist)
            return DataLoader(samples, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
                              pin_memory=dev.type == "cuda", persistent_workers=False)

        def prepare(b: Dict[str, torch.Tensor]) -> Tuple[Any, torch.Tensor]:
            return dense_features(model, b["img"].to(dev, non_blocking=True), s["precision"]), \
                b["target"].to(dev, non_blocking=True)[:, None]

        def loss_fn(inputs: Tuple[Any, torch.Tensor], it: int, j: int) -> torch.Tensor:
            feats, gt = inputs
            pred = depth_from_features(heads.heads[j], feats, tuple(gt.shape[-2:]))
            return depth_loss(pred, gt, it, warm_iters=warm, rank_sum=rank_sum(run), **s["loss"])

        last: Dict[str, Any] = {}

        def eval_fn(it: int) -> Dict[str, Dict[str, float]]:
            acc = self._test_online(run, test_ds, head)
            last.update(acc=acc, it=it)
            m = acc.compute()
            return {names[0]: {"rmse": m["rmse"], "abs_rel": m["abs_rel"]}}

        trainer.fit(batches, loss_fn, eval_fn, int(s["eval_interval"]), prepare=prepare)
        acc = last["acc"] if last.get("it") == int(s["max_iters"]) else self._test_online(run, test_ds, head)
        if run.dist.is_main:
            atomic_torch_save({"head": head.state_dict(), "in_channels": in_ch},
                              run.artifact("head.pt"), "probe head")
        run.notes.append("faithful: DVT NYU linear recipe, online features with the toolbox augmentations every "
                         + ("iteration; single process, global batch on one device" if run.dist.world_size == 1 else
                            f"iteration; global batch split over {run.dist.world_size} torchrun processes, loss of "
                            "the global batch from all-reduced sums"))
        extra = {"train_images": len(train_ds), "feature_dim": in_ch, "artifacts": {"head": run.artifact("head.pt")}}
        return self._finish(run, trainer, acc, extra)

    def _test_online(self, run: ProbeRun, test_ds: Any, head: DepthBinsHead) -> DepthAccumulator:
        """Full 480x640 frames, flip averaging (DVT ``aug_test``), Eigen crop, per-image metrics."""
        s, model, dev = run.settings, run.model, run.device
        samples = FixedViewSamples(test_ds, "depth", model.spec.mean_255, model.spec.std_255)
        mine = Subset(samples, run.dist.shard(range(len(samples))))  # torchrun: every rank its share of the frames
        loader = DataLoader(mine, batch_size=None, num_workers=run.cfg.num_workers, persistent_workers=False)
        acc = self._accumulator(run, bool(s["eigen_crop"]))
        was_training = head.training
        head.eval()

        def pred_fn(x: torch.Tensor) -> torch.Tensor:
            return depth_from_features(head, dense_features(model, x, s["precision"]), tuple(x.shape[-2:]))

        with torch.no_grad():
            for smp in loader:
                img = smp["img"][None].to(dev)
                pred = depth_flip_average(pred_fn, img) if s["flip_test"] else pred_fn(img)
                acc.update(pred[0, 0].float().cpu(), smp["target"])
        acc.all_reduce()  # per-image metric sums and counts of all ranks
        head.train(was_training)
        return acc

    # -- fast ------------------------------------------------------------------------------------
    def _fast(self, run: ProbeRun, spec: Any, train_split: str) -> RunRecord:
        s, cfg, model, dev = run.settings, run.cfg, run.model, run.device
        lrs, _, _, _ = self._optim(run)
        crop = (int(s["crop_size"][0]), int(s["crop_size"][1]))
        scale = float(s["depth_rescale_factor"])
        bs = run.inference_batch(16, 4)
        mean, std = model.spec.mean_255, model.spec.std_255

        def to_mm(depth: torch.Tensor) -> np.ndarray:  # metres -> the PNG's millimetres, exact
            return np.clip(np.rint(depth.numpy() / scale), 0, 65535).astype(np.uint16)

        def featurize(imgs: torch.Tensor) -> Dict[str, torch.Tensor]:
            f = dense_features(model, imgs.to(dev), s["precision"])
            return {"patch": f.patch, "cls": f.cls}

        def featurize_flip(imgs: torch.Tensor) -> Dict[str, torch.Tensor]:
            f = dense_features(model, imgs.to(dev), s["precision"])
            g = dense_features(model, imgs.flip(-1).to(dev), s["precision"])
            return {"patch": f.patch, "cls": f.cls, "patch_flip": g.patch, "cls_flip": g.cls}

        nyu_box = tuple(int(v) for v in s["nyu_crop_box"])
        train_ds = run.build(spec, train_split, depth_fixed_view_pipeline(scale, crop, nyu_box))
        view = f"nyucrop-center{crop[0]}x{crop[1]}"
        view_key: Dict[str, Any] = {"depth_rescale_factor": scale}
        if nyu_box != NYU_TRAIN_CROP:  # only another crop than the toolbox's: existing caches keep their names
            view_key["nyu_crop_box"] = list(nyu_box)
        tr_cache = run.open_cache(train_split, view, train_ds, view_key,
                                  {"patch": "float16", "cls": "float16", "depth": "uint16"})
        fill_cache(tr_cache, FixedViewSamples(train_ds, "depth", mean, std, pad_to=crop), featurize,
                   lambda smp: {"depth": to_mm(smp["target"])}, bs, cfg.num_workers, cfg.progress,
                   f"cache {run.dataset}/{train_split}", dist=run.dist)
        test_ds = run.build(spec, run.eval_split, depth_test_pipeline(scale))
        tview = "full+flip" if s["flip_test"] else "full"
        te_names = {"patch": "float16", "cls": "float16", "depth": "uint16"}
        if s["flip_test"]:
            te_names.update(patch_flip="float16", cls_flip="float16")
        te_cache = run.open_cache(run.eval_split, tview, test_ds, {"depth_rescale_factor": scale}, te_names)
        fill_cache(te_cache, FixedViewSamples(test_ds, "depth", mean, std),
                   featurize_flip if s["flip_test"] else featurize, lambda smp: {"depth": to_mm(smp["target"])},
                   bs, cfg.num_workers, cfg.progress, f"cache {run.dataset}/{run.eval_split}", dist=run.dist)

        n = len(tr_cache)
        n_hold = int(round(float(s["holdout_fraction"]) * n))
        if n < 2 or n_hold < 1 or n_hold >= n:
            raise DataError(f"{n} training images cannot be split into train and a held-out "
                            f"{s['holdout_fraction']} fraction; use more images (or a larger --limit)")
        perm = np.random.default_rng([cfg.seed, 1]).permutation(n)
        hold_idx, fit_idx = sorted(perm[:n_hold].tolist()), perm[n_hold:].tolist()
        in_ch = int(tr_cache.shape(0, "patch")[0] + tr_cache.shape(0, "cls")[0])
        train_loss = self._train_loss(run)
        tg_cache = None if train_loss == "pixel" else \
            self._output_targets(run, tr_cache, int(s["upsample"]) if train_loss == "head-output" else 1)
        with seeded(cfg.seed):
            heads = HeadBank([self._head(run, in_ch) for _ in lrs]).to(dev)
        names = [lr_name(lr) for lr in lrs]
        grid = tuple(int(v) for v in tr_cache.shape(0, "patch")[1:])
        fraction = tuple(float(f) for f in s.get("train_token_window", (1.0, 1.0)))
        window = window_size(grid, fraction)  # v4: each step's loss on a random window of the token grid
        fp = {"mode": "fast", "cache": tr_cache.path, "train_loss": train_loss,
              **({"targets": tg_cache.path} if tg_cache is not None else {}),
              **({"train_window_grid": list(window)} if window != grid else {})}
        trainer = self._trainer(run, heads, names, lrs, fp, f"{TASK} fast {run.dataset}")
        batch = int(s["batch_size"])
        warm = int(s["sigloss_warmup_iters"])

        def load(cache: FeatureCache, idx: List[int], suffix: str = "") -> torch.Tensor:
            patch = cache.stack(idx, "patch" + suffix, torch.float32).to(dev)
            cls = cache.stack(idx, "cls" + suffix, torch.float32).to(dev)
            return depth_head_input(patch, cls)

        def batches(start: int):
            sampler = IterationBatches(len(fit_idx), batch, start, int(s["max_iters"]), cfg.seed)
            for items in sampler:
                mine = run.dist.shard_batch(items)  # this rank's slice of the global batch
                idx = [fit_idx[k] for (_, _, k) in mine]
                if train_loss == "token":  # v3/v4: (C, B, h, w) in one pass per item, depth already on the token grid
                    # v4: only each item's window is read (offsets from seed, iteration and global slot)
                    wins = None if window == grid else random_windows(grid, fraction, cfg.seed, mine)
                    yield ((tr_cache.stack_channels_first(idx, "patch", wins).to(dev),
                            tr_cache.stack(idx, "cls", torch.float32).to(dev)),
                           tg_cache.stack(idx, "depth", torch.float32, wins).to(dev)[:, None])
                elif tg_cache is not None:  # v2: patch and CLS apart, depth already at the head's output size
                    yield ((tr_cache.stack(idx, "patch", torch.float32).to(dev),
                            tr_cache.stack(idx, "cls", torch.float32).to(dev)),
                           tg_cache.stack(idx, "depth", torch.float32).to(dev)[:, None])
                else:
                    yield load(tr_cache, idx), tr_cache.stack(idx, "depth", torch.float32).to(dev)[:, None] * scale

        def loss_fn(b: Tuple[Any, torch.Tensor], it: int, j: int) -> torch.Tensor:
            x, gt = b
            if tg_cache is not None:
                return depth_loss(depth_head_split_forward(heads.heads[j], *x), gt, it, warm_iters=warm,
                                  rank_sum=rank_sum(run), **s["loss"])
            return depth_loss(resize(heads.heads[j](x), tuple(gt.shape[-2:])), gt, it, warm_iters=warm,
                              rank_sum=rank_sum(run), **s["loss"])

        def token_losses(b: Tuple[Any, torch.Tensor], it: int) -> List[torch.Tensor]:
            (patch, cls), gt = b
            preds = depth_token_grid_train(heads.heads, patch, cls)
            ranks = rank_sum(run)
            if ranks is not None:  # under torchrun each head's loss is the global batch's (from rank sums)
                return [depth_loss(p, gt, it, warm_iters=warm, rank_sum=ranks, **s["loss"]) for p in preds]
            return list(depth_losses(preds, gt, it, warm_iters=warm, **s["loss"]))

        metric = str(s["select_metric"])
        last: Dict[str, Any] = {}

        def eval_fn(it: int) -> Dict[str, Dict[str, float]]:
            accs = [self._accumulator(run, eigen=False) for _ in heads.heads]  # train views are already cropped
            mine = run.dist.shard(hold_idx)  # torchrun: every rank its share of the held-out views
            with torch.no_grad():
                for k in range(0, len(mine), bs):
                    idx = mine[k:k + bs]
                    gt = tr_cache.stack(idx, "depth", torch.float32) * scale
                    for acc, pred in zip(accs, heads(load(tr_cache, idx))):
                        pred = resize(pred, tuple(gt.shape[-2:]))[:, 0].cpu()
                        for j in range(len(idx)):
                            acc.update(pred[j], gt[j])
            for acc in accs:
                acc.all_reduce()
            out = {nm: {metric: a.compute()[metric]} for nm, a in zip(names, accs)}
            last.update(it=it, scores=out)
            return out

        if train_loss == "token":  # the whole grid from one product: one backward of the summed losses
            trainer.fit(batches, None, eval_fn, int(s["eval_interval"]), losses_fn=token_losses)
        else:
            trainer.fit(batches, loss_fn, eval_fn, int(s["eval_interval"]))
        final = last["scores"] if last.get("it") == int(s["max_iters"]) else eval_fn(int(s["max_iters"]))
        scores = np.asarray([final[nm][metric] for nm in names], dtype=np.float64)
        best = int(np.nanargmin(scores) if metric in LOWER_IS_BETTER else np.nanargmax(scores))
        head = heads.heads[best].eval()
        acc = self._accumulator(run, bool(s["eigen_crop"]))
        mean_depth = mean_valid_depth(tr_cache, fit_idx, scale)
        base = self._accumulator(run, bool(s["eigen_crop"]))
        with torch.no_grad():
            for i in run.dist.shard(range(len(te_cache))):
                gt = torch.from_numpy(np.asarray(te_cache.get(i, "depth"), dtype=np.float32)) * scale
                size = tuple(gt.shape)
                pred = resize(head(load(te_cache, [i])), size)
                if s["flip_test"]:
                    pred = (pred + resize(head(load(te_cache, [i], "_flip")), size).flip(-1)) / 2
                acc.update(pred[0, 0].cpu(), gt)
                base.update(torch.full(size, mean_depth), gt)
        acc.all_reduce()
        base.all_reduce()
        if run.dist.is_main:
            atomic_torch_save({"head": head.state_dict(), "in_channels": in_ch, "lr": lrs[best]},
                              run.artifact("head.pt"), "probe head")
        bm = base.compute()
        extra = {"selected_lr": lrs[best], "heldout": {nm: final[nm][metric] for nm in names},
                 "heldout_images": n_hold, "fit_images": n - n_hold, "feature_dim": in_ch,
                 "token_grid_train": list(grid),
                 "cache_bytes_per_image": {"train": tr_cache.field_nbytes(["patch", "cls"]) / max(1, n),
                                           "test (with flip)": te_cache.field_nbytes(
                                               [f for f in te_names if f != "depth"]) / max(1, len(te_cache))},
                 # sanity reference: predict the mean valid depth of the fit views everywhere, tested identically
                 "baseline_mean_depth": {"depth_m": mean_depth, **record_metrics(bm)},
                 "artifacts": {"head": run.artifact("head.pt"), "train_cache": tr_cache.path,
                               "test_cache": te_cache.path}, "inference_batch": bs,
                 "train_loss": train_loss, "train_seconds": trainer.train_seconds}
        if tg_cache is not None:
            extra["artifacts"]["train_targets_cache"] = tg_cache.path
            extra["cache_bytes_per_image"]["train targets"] = tg_cache.nbytes / max(1, n)
            extra["train_target_grid"] = list(tg_cache.shape(0, "depth"))
        if window != grid:
            extra["train_window_grid"] = list(window)  # tokens; the protocol's train_token_window is the share
        run.notes.append("fast protocol (not faithful): one fixed view per training image (NYUCrop + centre crop), "
                         f"features cached in fp16, {len(lrs)} heads (lr grid) trained together, "
                         f"{FAST_LOSS_NOTES[train_loss]}{token_window_note(grid, window)}, "
                         f"best by held-out {metric} on {n_hold} train images")
        return self._finish(run, trainer, acc, extra)
