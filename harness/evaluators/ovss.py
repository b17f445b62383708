"""Zero-shot open-vocabulary semantic segmentation (the PH-Reg Table 1 task)."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..datasets.base import check_sample_shapes
from ..errors import DataError
from ..io_safety import atomic_write_text
from ..methods.pamr import pamr
from ..metrics.segmentation import IoUAccumulator
from ..ovss.inference import ImageJob, dense_logits, postprocess, shared_trunk_features
from ..profiling import OFF, StageTimer
from ..registry import EVALUATORS
from ..results.record import RunRecord, write_record
from ..runtime import DevicePolicy, device_policy, init_distributed, progress, select_device
from ..text.encoder import class_queries
from ..text.names import check_class_count, load_name_set
from .base import (
    Evaluator,
    RunConfig,
    build_models,
    claimed,
    finished,
    identify,
    make_record,
    resolve,
    skipped_samples,
)

#: images per loader batch; all their windows are pooled into backbone batches of ``batch_size`` (the default
#: per device kind is :func:`harness.runtime.device_policy`'s)
IMAGES_PER_STEP = 4
#: save a partial accumulator this often, so an interrupted run resumes where it stopped
CHECKPOINT_EVERY_S = 60.0


def mmseg_pipeline(settings: Dict[str, Any]) -> List[dict]:
    """cv2 BGR load, imrescale to short side S (long side ≤ max_long_side), labels at original size."""
    return [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=(int(settings["max_long_side"]), int(settings["resize"])), keep_ratio=True),
        dict(type="LoadAnnotations"),
    ]


def _collate(batch: List[dict]) -> List[dict]:
    """The samples as they come, each with two host tensors the loader can pin (``pin_memory``): ``img_rgb``, the
    resized image as (H, W, 3) uint8 RGB (a quarter of the bytes of a float image), and ``gt``, the label map as
    int64. Normalising happens on the device (:func:`to_model_input`)."""
    for item in batch:
        item["img_rgb"] = host_image(item["img"])
        item["gt"] = torch.from_numpy(np.asarray(item["gt_seg_map"]).astype(np.int64))
    return batch


def host_image(img_bgr: np.ndarray) -> torch.Tensor:
    """HWC BGR uint8 (cv2, as mmseg loads it) -> HWC RGB uint8 tensor on the host."""
    return torch.from_numpy(np.ascontiguousarray(img_bgr[..., ::-1]))


def to_model_input(img_rgb: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                   non_blocking: bool = False) -> torch.Tensor:
    """HWC RGB uint8 -> CHW float on ``device``, (x - mean) / std on the 0-255 scale (mmseg SegDataPreProcessor).

    ``non_blocking`` queues the copy (a pinned source makes it truly asynchronous) instead of waiting for it."""
    t = img_rgb.to(device, non_blocking=non_blocking).permute(2, 0, 1).float()
    return (t - mean) / std


def normalise(img_bgr: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> torch.Tensor:
    """HWC BGR uint8 -> CHW RGB float, (x - mean) / std on the 0-255 scale (mmseg SegDataPreProcessor)."""
    return to_model_input(host_image(img_bgr), mean, std, device)


@EVALUATORS.register("ovss")
class OVSSEvaluator(Evaluator):
    """Training-free zero-shot segmentation with a CLIP text tower, mmseg datasets and IoUMetric semantics."""

    def run(self, cfg: RunConfig) -> RunRecord:
        return self.run_methods(cfg, [cfg.method])[0]

    def run_methods(self, cfg: RunConfig, methods: Sequence[str]) -> List[RunRecord]:
        """Evaluate several methods of one backbone in one pass (shared data, text and trunk).

        Returns one record per method; finished records are read back, not recomputed (unless --force).
        """
        timer = cfg.profiler or OFF
        with timer.stage("setup"):
            res = resolve(cfg, "ovss", methods)
            dist = init_distributed()
            spec, dataset_name, settings = res.spec, res.dataset, res.settings
            device = select_device(cfg.device, dist)
            policy = device_policy(device)
        if timer.enabled and policy.profiler_sync is not None:  # charge queued GPU work to the stage that launched it
            timer.sync = policy.profiler_sync
        with timer.stage("text"):
            names = load_name_set(settings["name_set"], spec.key)
            check_class_count(names, spec.num_classes, f"name set {settings['name_set']!r} for {dataset_name}")
        with timer.stage("dataset screening"):
            spec.check(cfg.data_root, cfg.split)

        with timer.stage("model build"):
            models = build_models(cfg, res.methods, device)
            base = models[0]
            if not base.spec.has_text:
                raise DataError(f"backbone {cfg.backbone!r} has no text tower; zero-shot segmentation needs a CLIP id")
            base.backbone.check_text()  # a CLIP id whose weights file had no text tower says which file
        jobs: List[_MethodRun] = []
        records: Dict[int, RunRecord] = {}
        with timer.stage("records"):
            for i, model in enumerate(models):
                ident = identify("ovss", res, model, cfg)
                done_rec = finished(ident, cfg)
                if done_rec is not None:
                    records[i] = done_rec
                else:
                    jobs.append(_MethodRun(i, model, model.name, ident.key, ident.path,
                                           IoUAccumulator(spec.num_classes, device=device)))
        if not jobs:
            return [records[i] for i in range(len(models))]
        with contextlib.ExitStack() as held:
            with timer.stage("records"):  # a second run of the same records waits, then reads them back
                held.enter_context(claimed(jobs, cfg, records, enabled=dist.is_main))
            if jobs:
                self._pass(cfg, res, jobs, records, names, dist, device, base, timer, policy)
        return [records[i] for i in range(len(models))]

    def _pass(self, cfg: RunConfig, res: Any, jobs: List["_MethodRun"], records: Dict[int, RunRecord],
              names: Any, dist: Any, device: torch.device, base: Any, timer: StageTimer = OFF,
              policy: Optional[DevicePolicy] = None) -> None:
        """Segment the split once for every method of ``jobs``; write their records into ``records``.

        ``base`` is the pass's first model (its text tower encodes the class queries for every method)."""
        spec, dataset_name, settings = res.spec, res.dataset, res.settings
        policy = policy or device_policy(device)
        t0 = time.time()
        # every sample's files are screened here: a bad image or label map fails now (or is skipped), not in an hour
        with timer.stage("dataset screening"):
            ds = spec.build(cfg.data_root, cfg.split, mmseg_pipeline(settings), limit=cfg.limit,
                            on_bad_image=cfg.on_bad_image)
            skipped = skipped_samples(ds)
            n_total = len(ds)
        with timer.stage("text"):
            text = class_queries(base, names, settings["templates"], device, cfg.cache_dir)
        if cfg.progress and dist.is_main and text.stats.encoded:
            print(text.stats.summary(), file=sys.stderr)
        indices = list(range(dist.rank, n_total, dist.world_size))
        with timer.stage("records"):
            done = 0 if cfg.force else _load_partials(jobs, dist.rank, dist.world_size, n_total, skipped)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, indices[done:]),
                                             batch_size=IMAGES_PER_STEP, num_workers=cfg.num_workers,
                                             collate_fn=_collate, persistent_workers=False,
                                             pin_memory=policy.pin_memory)
        bs = cfg.batch_size or policy.batch_size
        label = ",".join(j.method for j in jobs)
        bar = progress(total=len(indices), desc=f"{label}/{dataset_name}", enabled=cfg.progress and dist.is_main)
        bar.update(done)
        try:
            self._loop(loader, jobs, text, settings, spec, bar, device, bs, dist.rank, done, cfg.save_predictions,
                       dist.world_size, n_total, skipped, timer, policy.non_blocking)
        finally:
            bar.close()
        with timer.stage("records"):
            self._write_records(cfg, res, jobs, records, dist, device, text, bs, n_total, skipped, t0, timer)

    def _write_records(self, cfg: RunConfig, res: Any, jobs: List["_MethodRun"], records: Dict[int, RunRecord],
                       dist: Any, device: torch.device, text: Any, bs: int, n_total: int,
                       skipped: Sequence[Dict[str, str]], t0: float, timer: StageTimer) -> None:
        """One record per method of the pass; with ``--profile`` each carries the breakdown so far."""
        settings = res.settings
        classes = res.spec.class_names
        profile = {"profile": timer.as_dict()} if timer.enabled else {}
        for job in jobs:
            job.acc.all_reduce()
            m = job.acc.compute()
            rec = make_record(
                "ovss", res, job.model, cfg, {"mIoU": m["mIoU"], "mAcc": m["mAcc"], "aAcc": m["aAcc"]}, n_total,
                {**settings, "limit": cfg.limit, "batch_size": bs, "text_cache_hit": text.cache_hit,
                 "text_encoding": text.stats.as_dict(),
                 "methods_in_pass": [j.method for j in jobs], **profile},
                ["metrics x100; IoU accumulated over the split, mIoU = nanmean over classes (mmseg IoUMetric)",
                 f"wall time covers the whole pass of {len(jobs)} method(s) sharing the backbone trunk"],
                t0, device, per_class={c: {"IoU": iou, "Acc": a} for c, iou, a in zip(classes, m["IoU"], m["Acc"])},
                world_size=dist.world_size, skipped=skipped)
            if dist.is_main:
                write_record(rec, job.path)
            if os.path.isfile(job.partial(dist.rank)):
                os.remove(job.partial(dist.rank))
            records[job.index] = rec

    def _loop(self, loader, jobs: List["_MethodRun"], text, settings, spec, bar, device, bs: int, rank: int,
              done: int, save_dir: Optional[str] = None, world_size: int = 1, n_total: int = 0,
              skipped: Sequence[Dict[str, str]] = (), timer: StageTimer = OFF, non_blocking: bool = False) -> None:
        """Segment every image of ``loader`` for every method; saves partial state periodically and on Ctrl-C.

        Nothing in the per-window or per-image path reads a device value back to the host (on a GPU the host
        queues work and never waits for it): images and label maps are copied to the device (``non_blocking``),
        logits, PAMR, post-processing and the IoU areas stay there. The host waits only where it must have
        numbers: the partial state saved every :data:`CHECKPOINT_EVERY_S` seconds, the records at the end
        (one copy of the areas per method), ``--save-predictions`` (one copy per image and method, to write
        the PNG) and ``--profile`` (each stage waits for its kernels)."""
        base = jobs[0].model
        mean = torch.tensor(base.spec.mean_255, device=device).view(3, 1, 1)
        std = torch.tensor(base.spec.std_255, device=device).view(3, 1, 1)
        features = shared_trunk_features([j.model for j in jobs], settings["precision"])
        pamr_cfg = settings.get("pamr")
        last_save = time.time()
        try:
            with torch.inference_mode():
                batches = iter(loader)
                while True:
                    with timer.stage("data loading"):  # decoding + resizing (workers), then checks + normalising
                        batch = next(batches, None)
                        if batch is None:
                            break
                        images, gts = [], []
                        for item in batch:
                            check_sample_shapes(item["img_path"], item["seg_map_path"], item["ori_shape"][:2],
                                                item["gt_seg_map"].shape)
                            images.append(ImageJob(to_model_input(item["img_rgb"], mean, std, device, non_blocking),
                                                   tuple(int(v) for v in item["ori_shape"][:2])))
                            gts.append(item["gt"].to(device, non_blocking=non_blocking))
                    logits = dense_logits(features, images, text.embeddings, settings["mode"], int(settings["crop"]),
                                          int(settings["stride"]), bs, timer)
                    for n, (item, image, gt) in enumerate(zip(batch, images, gts)):
                        preds = []
                        for per_job in logits:  # every method's prediction first: no state changes yet
                            lg = per_job[n]
                            if pamr_cfg:
                                with timer.stage("pamr"):
                                    img = torch.nn.functional.interpolate(image.image[None], size=image.ori_size,
                                                                          mode="bilinear")
                                    lg = pamr(img, lg[None], int(pamr_cfg["steps"]),
                                              tuple(pamr_cfg["dilations"]))[0]
                            with timer.stage("post-processing"):
                                preds.append(postprocess(lg, text.query_class, spec.num_classes,
                                                         float(settings["logit_scale"]),
                                                         float(settings["prob_thd"] or 0.0), settings.get("area_thd")))
                        # then all accumulators together; a Ctrl-C in between rolls them back to `done` images
                        committed = [job.acc.areas.clone() for job in jobs]
                        try:
                            with timer.stage("metric"):
                                for job, pred in zip(jobs, preds):
                                    job.acc.update(pred, gt)
                        except KeyboardInterrupt:
                            for job, areas in zip(jobs, committed):
                                job.acc.areas = areas
                            raise
                        done += 1
                        if save_dir:
                            with timer.stage("predictions"):
                                for job, pred in zip(jobs, preds):
                                    sub = save_dir if len(jobs) == 1 else os.path.join(save_dir, job.method)
                                    save_prediction(sub, item["img_path"], pred)
                    bar.update(len(batch))
                    if time.time() - last_save > CHECKPOINT_EVERY_S:
                        with timer.stage("records"):
                            _save_partials(jobs, rank, done, world_size, n_total, skipped)
                        last_save = time.time()
        except KeyboardInterrupt:
            _save_partials(jobs, rank, done, world_size, n_total, skipped)
            raise


@dataclass
class _MethodRun:
    """One method's share of a pass: its model, record key/path and accumulator."""

    index: int
    model: object
    method: str
    key: str
    path: str
    acc: IoUAccumulator

    def partial(self, rank: int) -> str:
        return self.path + f".partial-rank{rank}.json"


def _skipped_images(skipped: Sequence[Dict[str, str]]) -> List[str]:
    return sorted(s["image"] for s in skipped)


def _load_partials(jobs: List[_MethodRun], rank: int, world_size: int = 1, n_total: int = 0,
                   skipped: Sequence[Dict[str, str]] = ()) -> int:
    """Resume point: images already done by every method of the pass (0 unless all partials agree).

    ``done`` counts images of this rank's shard ``range(rank, n_total, world_size)``, so a partial written
    under another world size (or for another image count) describes other images: it is not resumed
    (resuming it would skip some images and count others twice).
    """
    states = []
    for job in jobs:
        p = job.partial(rank)
        if not os.path.isfile(p):
            return 0
        try:
            with open(p) as f:
                st = json.load(f)
        except (OSError, ValueError):  # unreadable partial state: start the pass over, never use it
            return 0
        if st.get("key") != job.key or st.get("world_size") != world_size or st.get("num_images") != n_total:
            return 0
        if st.get("skipped", []) != _skipped_images(skipped):  # other images were left out: other shards
            return 0
        states.append(st)
    if len({int(st["done"]) for st in states}) != 1:
        return 0
    for job, st in zip(jobs, states):
        job.acc = IoUAccumulator.from_state_dict(st["acc"], device=job.acc.areas.device)
    return int(states[0]["done"])


def _save_partials(jobs: List[_MethodRun], rank: int, done: int, world_size: int = 1, n_total: int = 0,
                   skipped: Sequence[Dict[str, str]] = ()) -> None:
    for job in jobs:
        state = {"key": job.key, "done": done, "world_size": world_size, "num_images": n_total,
                 "skipped": _skipped_images(skipped), "acc": job.acc.state_dict()}
        atomic_write_text(job.partial(rank), json.dumps(state, default=_jsonable), "partial OVSS state")


def _jsonable(x: Any) -> Any:
    return x.tolist() if hasattr(x, "tolist") else str(x)


def save_prediction(folder: str, img_path: str, pred: torch.Tensor) -> str:
    """Write a prediction as a 16-bit PNG of class indices named after its image."""
    import cv2

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, os.path.splitext(os.path.basename(img_path))[0] + ".png")
    cv2.imwrite(path, pred.cpu().numpy().astype(np.uint16))
    return path
