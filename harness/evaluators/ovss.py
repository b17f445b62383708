"""Zero-shot open-vocabulary semantic segmentation (the PH-Reg Table 1 task)."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..errors import DataError
from ..metrics.segmentation import IoUAccumulator
from ..models import build_dense_model
from ..ovss.inference import ImageJob, dense_logits, postprocess
from ..methods.pamr import pamr
from ..protocols import get_protocol
from ..registry import BACKBONES, DATASETS, EVALUATORS, METHODS
from ..results.record import RunRecord, read_record, record_path, run_key, write_record
from ..runtime import device_description, init_distributed, progress, select_device
from ..text.encoder import class_queries
from ..text.names import check_class_count, load_name_set
from .base import Evaluator, RunConfig

#: images per loader batch; all their windows are pooled into backbone batches of ``batch_size``
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
    return batch


def normalise(img_bgr: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> torch.Tensor:
    """HWC BGR uint8 -> CHW RGB float, (x - mean) / std on the 0-255 scale (mmseg SegDataPreProcessor)."""
    t = torch.from_numpy(np.ascontiguousarray(img_bgr[..., ::-1])).to(device).permute(2, 0, 1).float()
    return (t - mean) / std


@EVALUATORS.register("ovss")
class OVSSEvaluator(Evaluator):
    """Training-free zero-shot segmentation with a CLIP text tower, mmseg datasets and IoUMetric semantics."""

    def run(self, cfg: RunConfig) -> RunRecord:
        BACKBONES.get(cfg.backbone), METHODS.get(cfg.method)  # unknown names fail before any work
        dist = init_distributed()
        proto = get_protocol("ovss", cfg.protocol)
        spec = DATASETS.get(cfg.dataset)
        dataset_name = DATASETS.canonical(cfg.dataset)
        settings = proto.settings(dataset_name)
        device = select_device(cfg.device, dist)
        names = load_name_set(settings["name_set"], spec.key)
        check_class_count(names, spec.num_classes, f"name set {settings['name_set']!r} for {dataset_name}")

        spec.check(cfg.data_root, cfg.split)
        model = build_dense_model(cfg.backbone, cfg.method, cfg.method_params, cfg.weights, cfg.random_init,
                                  cfg.allow_download).to(device)
        if not model.spec.has_text:
            raise DataError(f"backbone {cfg.backbone!r} has no text tower; zero-shot segmentation needs a CLIP id")
        key = run_key("ovss", proto.id, proto.version, model.spec.id, model.backbone.weights_id,
                      model.describe()["method"], model.params, dataset_name, cfg.split, cfg.limit)
        method_name = str(model.describe()["method"])
        out_path = record_path(cfg.results_dir, "ovss", proto.id, model.spec.id, method_name, dataset_name, key)
        if os.path.isfile(out_path) and not cfg.force:
            return read_record(out_path)

        t0 = time.time()
        text = class_queries(model, names, settings["templates"], device, cfg.cache_dir)
        ds = spec.build(cfg.data_root, cfg.split, mmseg_pipeline(settings), limit=cfg.limit)
        n_total = len(ds)
        indices = list(range(dist.rank, n_total, dist.world_size))
        acc = IoUAccumulator(spec.num_classes)
        partial = out_path + f".partial-rank{dist.rank}.json"
        done = 0
        if os.path.isfile(partial) and not cfg.force:
            with open(partial) as f:
                state = json.load(f)
            if state.get("key") == key:
                acc = IoUAccumulator.from_state_dict(state["acc"])
                done = int(state["done"])
        todo = indices[done:]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, todo), batch_size=IMAGES_PER_STEP,
                                             num_workers=cfg.num_workers, collate_fn=_collate,
                                             persistent_workers=False)
        mean = torch.tensor(model.spec.mean_255, device=device).view(3, 1, 1)
        std = torch.tensor(model.spec.std_255, device=device).view(3, 1, 1)
        bs = cfg.batch_size or (32 if device.type == "cuda" else 8)
        bar = progress(total=len(indices), desc=f"{cfg.method}/{dataset_name}", enabled=cfg.progress and dist.is_main)
        bar.update(done)
        try:
            self._loop(loader, model, text, settings, spec, acc, bar, mean, std, device, bs, partial, key, done,
                       cfg.save_predictions)
        finally:
            bar.close()
        acc.all_reduce()
        m = acc.compute()
        classes = spec.class_names
        rec = RunRecord(
            task="ovss", protocol=proto.id, protocol_version=proto.version, backbone=model.spec.id,
            weights=model.backbone.weights_id, method=model.describe()["method"], method_params=model.params,
            dataset=dataset_name, split=cfg.split, data_root=os.path.abspath(cfg.data_root), num_images=n_total,
            metrics={"mIoU": m["mIoU"], "mAcc": m["mAcc"], "aAcc": m["aAcc"]},
            per_class={c: {"IoU": iou, "Acc": a} for c, iou, a in zip(classes, m["IoU"], m["Acc"])},
            settings={**settings, "limit": cfg.limit, "batch_size": bs, "text_cache_hit": text.cache_hit},
            notes=["metrics x100; IoU accumulated over the split, mIoU = nanmean over classes (mmseg IoUMetric)"]
            + (["random-init weights: numbers are not meaningful"] if cfg.random_init else []),
            wall_time_s=time.time() - t0, device=device_description(device), world_size=dist.world_size,
        )
        if dist.is_main:
            write_record(rec, out_path)
        if os.path.isfile(partial):
            os.remove(partial)
        return rec

    def _loop(self, loader, model, text, settings, spec, acc: IoUAccumulator, bar, mean, std, device, bs: int,
              partial: str, key: str, done: int, save_dir: Optional[str] = None) -> None:
        """Segment every image of ``loader`` into ``acc``; saves a partial state periodically and on Ctrl-C."""
        pamr_cfg = settings.get("pamr")
        last_save = time.time()
        try:
            with torch.inference_mode():
                for batch in loader:
                    jobs = []
                    for item in batch:
                        gt = item["gt_seg_map"]
                        ori = tuple(int(v) for v in item["ori_shape"][:2])
                        if tuple(gt.shape[:2]) != ori:
                            raise DataError(
                                f"label map {item['seg_map_path']} is {gt.shape[1]}x{gt.shape[0]} but its image "
                                f"{item['img_path']} is {ori[1]}x{ori[0]}: label maps must have the image's size "
                                "(re-create them with `harness data prepare` or the dataset's official converter)")
                        jobs.append(ImageJob(normalise(item["img"], mean, std, device), ori))
                    logits = dense_logits(model, jobs, text.embeddings, settings["mode"], int(settings["crop"]),
                                          int(settings["stride"]), bs)
                    for item, job, lg in zip(batch, jobs, logits):
                        if pamr_cfg:
                            img = torch.nn.functional.interpolate(job.image[None], size=job.ori_size, mode="bilinear")
                            lg = pamr(img, lg[None], int(pamr_cfg["steps"]), tuple(pamr_cfg["dilations"]))[0]
                        pred = postprocess(lg, text.query_class, spec.num_classes, float(settings["logit_scale"]),
                                           float(settings["prob_thd"] or 0.0), settings.get("area_thd"))
                        acc.update(pred.cpu(), torch.from_numpy(np.asarray(item["gt_seg_map"]).astype(np.int64)))
                        if save_dir:
                            save_prediction(save_dir, item["img_path"], pred)
                        done += 1
                    bar.update(len(batch))
                    if time.time() - last_save > CHECKPOINT_EVERY_S:
                        _save_partial(partial, key, acc, done)
                        last_save = time.time()
        except KeyboardInterrupt:
            _save_partial(partial, key, acc, done)
            raise


def save_prediction(folder: str, img_path: str, pred: torch.Tensor) -> str:
    """Write a prediction as a 16-bit PNG of class indices named after its image."""
    import cv2

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, os.path.splitext(os.path.basename(img_path))[0] + ".png")
    cv2.imwrite(path, pred.cpu().numpy().astype(np.uint16))
    return path


def _save_partial(path: str, key: str, acc: IoUAccumulator, done: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"key": key, "done": done, "acc": acc.state_dict()}, f)
    os.replace(tmp, path)
