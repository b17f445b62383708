"""``harness run artifacts``: label-free measures of artifact tokens, on any image folder or dataset.

Why label-free: whether a cleaner removes artifact tokens can be read off the features themselves, on any
images, before (and beside) any downstream task. Following Chen et al., "Vision Transformers with
Self-Distilled Registers" (PH-Reg), NeurIPS 2025, arXiv:2505.21501, §4.3, every method's dense output is
measured by

* the share of outlier patch tokens by norm, high *and* low (CLIP's artifacts can be low-norm: Fig. 6-7),
* the spread of the patch norms (coefficient of variation; Fig. 7: cleaning shrinks it),
* shift consistency (Fig. 5): the cosine of each token to its target, the average of the *same* model's
  features over PH-Reg's shifted, flipped views mapped back to the token's position, read at percentiles of
  dissimilarity over all tokens of the run,
* on labelled datasets with a CLIP backbone, PH-Reg Table S.4's Pearson correlation of each class's query
  map with its one-hot ground truth, the maps computed by the OVSS inference under the ovss protocol the
  artifacts protocol names (sliding windows, name set, templates, PAMR when that protocol has it).

The measures are :mod:`harness.metrics.artifacts`; the view draw is the ``tta`` method's
(:func:`~harness.methods.tta.view_plan`). Several methods share one pass (data, text queries and the
backbone trunk through :func:`~harness.ovss.inference.shared_trunk_features`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..datasets.safety import screen_images
from ..errors import ConfigError, DataError
from ..image_folder import load_image
from ..methods.pamr import pamr
from ..methods.tta import View, apply_view, source_positions, view_plan
from ..metrics.artifacts import (
    dissimilarity_percentiles,
    norm_spread,
    outlier_share,
    patch_norms,
    pearson_with_onehot,
    token_cosine,
)
from ..ovss.inference import ImageJob, dense_logits, shared_trunk_features
from ..protocols import get_protocol
from ..registry import EVALUATORS
from ..results.record import RunRecord, write_record
from ..runtime import Dist, device_policy, init_distributed, progress, select_device
from ..text.encoder import TextQueries, class_queries
from ..text.names import check_class_count, load_name_set
from .base import (
    Evaluator,
    Resolved,
    RunConfig,
    build_models,
    claimed,
    finished,
    identify,
    make_record,
    resolve,
    skipped_samples,
)
from .ovss import mmseg_pipeline, normalise

#: images per loader step; their views are pooled into backbone batches of ``batch_size`` images (views count as
#: images; the default per device kind is :func:`harness.runtime.device_policy`'s, as for the OVSS evaluator)
IMAGES_PER_STEP = 4
#: save the partial state this often, so an interrupted run resumes where it stopped
CHECKPOINT_EVERY_S = 60.0
#: settings every artifacts protocol must give
REQUIRED = ("size_for_patch", "views", "shift_frac", "flip_prob", "view_seed", "fill", "percentiles",
            "outlier_cutoff", "ovss_protocol")


# -- the measures of one method -------------------------------------------------------------------
@dataclass
class ArtifactStats:
    """Running sums of one method's measures over the images seen so far (saved for resume)."""

    images: int = 0
    tokens: int = 0
    high: float = 0.0  # outlier tokens, summed over images
    low: float = 0.0
    cv_sum: float = 0.0  # per-image coefficients of variation, summed
    cosines: List[torch.Tensor] = field(default_factory=list)  # per image (N,) float32
    pearson: List[float] = field(default_factory=list)  # per scored image
    pearson_unscored: int = 0  # labelled images without a scorable class (all ignore, constant maps)

    def add_tokens(self, patch: torch.Tensor, target: torch.Tensor, cutoff: float) -> None:
        """Norm measures of (B, C, h, w) features and their cosine to the (B, C, h, w) view target."""
        norms = patch_norms(patch.float())
        b, n = norms.shape
        share = outlier_share(norms, cutoff)
        self.high += share["high"] * b * n
        self.low += share["low"] * b * n
        self.cv_sum += float(norm_spread(norms).sum())
        self.cosines += [c.float().cpu() for c in token_cosine(patch, target)]
        self.images += b
        self.tokens += b * n

    def add_pearson(self, value: Optional[float]) -> None:
        if value is None:
            self.pearson_unscored += 1
        else:
            self.pearson.append(float(value))

    def compute(self, percentiles: Sequence[int], labelled: bool) -> Dict[str, float]:
        """Record metrics: outlier shares in percent, mean CV, cosines at dissimilarity percentiles, Pearson."""
        if not self.images:
            raise DataError("no images were measured")
        out = {"outliers_high": 100.0 * self.high / self.tokens, "outliers_low": 100.0 * self.low / self.tokens,
               "norm_cv": self.cv_sum / self.images}
        for p, v in dissimilarity_percentiles(self.cosines, percentiles).items():
            out[f"cos_p{p}"] = v
        if labelled and self.pearson:
            out["pearson"] = float(np.mean(self.pearson))
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"images": self.images, "tokens": self.tokens, "high": self.high, "low": self.low,
                "cv_sum": self.cv_sum, "cosines": list(self.cosines), "pearson": list(self.pearson),
                "pearson_unscored": self.pearson_unscored}

    @classmethod
    def from_state_dict(cls, st: Dict[str, Any]) -> "ArtifactStats":
        return cls(**st)

    def all_reduce(self, dist: Dist) -> None:
        """Under torchrun (images sharded over the ranks): the sums of every rank added up, the per-token cosines
        and per-image Pearson scores of every rank joined (the percentiles need all tokens), on every rank."""
        if dist.world_size <= 1:
            return
        sums = dist.total([self.images, self.tokens, self.high, self.low, self.cv_sum, self.pearson_unscored])
        self.images, self.tokens, self.pearson_unscored = int(sums[0]), int(sums[1]), int(sums[5])
        self.high, self.low, self.cv_sum = sums[2], sums[3], sums[4]
        parts = dist.gather((self.cosines, self.pearson))
        self.cosines = [c for cos, _ in parts for c in cos]
        self.pearson = [p for _, pear in parts for p in pear]


def view_target(per_view: Sequence[torch.Tensor], views: Sequence[View]) -> torch.Tensor:
    """Average of per-view (B, C, h, w) features mapped back to the source positions they show.

    Every position counts the views in which it is visible; view 0 (the identity) sees them all.
    """
    b, c, h, w = per_view[0].shape
    total = per_view[0].new_zeros(b, c, h * w, dtype=torch.float64)
    count = per_view[0].new_zeros(h * w, dtype=torch.float64)
    for feats, view in zip(per_view, views):
        src, valid = source_positions((h, w), view)
        src, valid = src.to(feats.device), valid.to(feats.device)
        total.index_add_(2, src[valid], feats.reshape(b, c, h * w)[:, :, valid].double())
        count.index_add_(0, src[valid], torch.ones_like(src[valid], dtype=torch.float64))
    return (total / count).reshape(b, c, h, w)


def class_maps(logits: torch.Tensor, query_class: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(Q, H, W) query cosines -> (K, H, W): per class the maximum over its queries (no softmax: Table S.4's
    score needs no knowledge of the other classes)."""
    if logits.shape[0] == num_classes:
        return logits
    out = torch.full((num_classes, *logits.shape[1:]), float("-inf"), device=logits.device, dtype=logits.dtype)
    return out.scatter_reduce(0, query_class.view(-1, 1, 1).expand_as(logits), logits, reduce="amax")


def input_size(settings: Dict[str, Any], patch: int, where: str) -> int:
    """The square input side for a backbone's patch size (``size_for_patch`` of the protocol)."""
    sizes = {int(k): int(v) for k, v in (settings["size_for_patch"] or {}).items()}
    if patch not in sizes:
        raise ConfigError(f"{where}: size_for_patch has no entry for patch size {patch} (has {sorted(sizes)})")
    if sizes[patch] % patch:
        raise ConfigError(f"{where}: size_for_patch {patch}: {sizes[patch]} is not a multiple of the patch size")
    return sizes[patch]


# -- data ---------------------------------------------------------------------------------------------
class _Items(torch.utils.data.Dataset):
    """Image i as the artifact measures see it (resized, centre-cropped, normalised) plus, for a labelled
    dataset, the mmseg sample of the OVSS pipeline (resized image, label map at original size)."""

    def __init__(self, paths: Optional[List[str]], ds: Any, size: int, mean, std) -> None:
        self.paths, self.ds, self.size, self.mean, self.std = paths, ds, size, mean, std

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.ds)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = {"ovss": None} if self.ds is None else {"ovss": self.ds[i]}
        path = self.paths[i] if self.paths is not None else item["ovss"]["img_path"]
        item["path"] = path
        item["image"] = load_image(path, self.size, self.mean, self.std)
        return item


def _collate(batch: List[dict]) -> List[dict]:
    return batch


@dataclass
class _Job:
    """One method's share of a pass: its model, record key/path and running measures."""

    index: int
    model: Any
    key: str
    path: str
    stats: ArtifactStats = field(default_factory=ArtifactStats)
    #: under torchrun each rank keeps the partial state of its own share of the images
    rank: int = 0
    world_size: int = 1

    @property
    def partial(self) -> str:
        return self.path + (".partial.pt" if self.world_size == 1 else f".partial-rank{self.rank}.pt")


@dataclass
class _Pearson:
    """What the Pearson score needs: the OVSS settings, the text queries and the class count."""

    settings: Dict[str, Any]
    protocol: str
    version: int
    text: TextQueries
    num_classes: int


@EVALUATORS.register("artifacts")
class ArtifactsEvaluator(Evaluator):
    """Label-free artifact measures (norm outliers, norm spread, shift consistency) + Table S.4's Pearson."""

    def run(self, cfg: RunConfig) -> RunRecord:
        return self.run_methods(cfg, [cfg.method])[0]

    def run_methods(self, cfg: RunConfig, methods: Sequence[str]) -> List[RunRecord]:
        """Measure several methods of one backbone in one pass; finished records are read back."""
        dist = init_distributed()
        res = resolve(cfg, "artifacts", methods)
        settings = res.settings
        missing = [k for k in REQUIRED if k not in settings]
        if missing:
            raise ConfigError(f"protocol {res.where} lacks {', '.join(missing)}")
        if settings["fill"] != "white":
            raise ConfigError(f"protocol {res.where}: fill {settings['fill']!r} is not supported (white, as the tta "
                              f"method and the authors' data code fill shifted views)")
        spec = res.spec
        spec.check(cfg.data_root, cfg.split)
        device = select_device(cfg.device, dist)
        models = build_models(cfg, res.methods, device)
        base = models[0]
        jobs: List[_Job] = []
        records: Dict[int, RunRecord] = {}
        for i, model in enumerate(models):
            ident = identify("artifacts", res, model, cfg)
            done_rec = finished(ident, cfg)
            if done_rec is not None:
                records[i] = done_rec
            else:
                jobs.append(_Job(i, model, ident.key, ident.path, rank=dist.rank, world_size=dist.world_size))
        if not jobs:
            return [records[i] for i in range(len(models))]

        with claimed(jobs, cfg, records, enabled=dist.is_main):
            if jobs:
                self._pass(cfg, res, jobs, records, base, device, dist)
        return [records[i] for i in range(len(models))]

    def _pass(self, cfg: RunConfig, res: Resolved, jobs: List[_Job], records: Dict[int, RunRecord], base,
              device: torch.device, dist: Optional[Dist] = None) -> None:
        """Measure every image once for every method of ``jobs``; write their records into ``records``.

        Under torchrun every rank measures the images ``rank, rank + world_size, ...`` (resuming from its own
        partial state); the sums are then added up and the cosines joined, and rank 0 writes the records."""
        dist = dist or Dist()
        settings, spec = res.settings, res.spec
        t0 = time.time()
        labelled = bool(getattr(spec, "labelled", True))
        pear = self._pearson_setup(res, base, cfg, device) if labelled and base.spec.has_text else None
        patch = base.spec.patch_size
        size = input_size(settings, patch, res.where)
        items, skipped = self._items(res, cfg, pear, size, base.spec)
        n_total = len(items)
        grid = (size // patch, size // patch)
        views = view_plan(grid, int(settings["views"]), float(settings["shift_frac"]), float(settings["flip_prob"]),
                          int(settings["view_seed"]))
        mine = dist.shard(range(n_total))
        done = 0 if cfg.force else _load_partials(jobs, n_total)
        policy = device_policy(device)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(items, mine[done:]),
                                             batch_size=IMAGES_PER_STEP, num_workers=cfg.num_workers,
                                             collate_fn=_collate, pin_memory=policy.pin_memory)
        bs = cfg.batch_size or policy.batch_size
        bar = progress(total=len(mine), desc=f"{','.join(j.model.name for j in jobs)}/{res.dataset}",
                       enabled=cfg.progress and dist.is_main)
        bar.update(done)
        try:
            self._loop(loader, jobs, views, settings, pear, bar, device, bs, done, n_total, policy.non_blocking)
        finally:
            bar.close()
        for job in jobs:
            job.stats.all_reduce(dist)
        notes = ["outliers_high/outliers_low: percent of patch tokens whose per-image modified z-score of the norm "
                 f"is above +{settings['outlier_cutoff']} / below -{settings['outlier_cutoff']}; norm_cv: mean "
                 "per-image std/mean of the patch norms; cos_pP: cosine to the view-averaged target at the P-th "
                 "percentile of dissimilarity over all tokens (PH-Reg Fig. 5)",
                 f"wall time covers the whole pass of {len(jobs)} method(s) sharing the backbone trunk"]
        if pear is not None:
            notes.append("pearson: PH-Reg Table S.4, per image the mean over present classes of the Pearson "
                         "correlation of the class's query map (max cosine over its queries, no softmax) with its "
                         "one-hot ground truth, then the mean over images")
        elif labelled:
            notes.append(f"no pearson: backbone {base.spec.id!r} has no text tower")
        for job in jobs:
            metrics = job.stats.compute([int(p) for p in settings["percentiles"]], pear is not None)
            extra = {"input_size": size, "grid": list(grid), "view_plan": [list(v) for v in views],
                     "limit": cfg.limit, "batch_size": bs, "methods_in_pass": [j.model.name for j in jobs]}
            if pear is not None:
                extra.update(ovss_protocol_version=pear.version, ovss_settings=pear.settings,
                             text_cache_hit=pear.text.cache_hit, pearson_images=len(job.stats.pearson),
                             pearson_unscored_images=job.stats.pearson_unscored)
            rec = make_record("artifacts", res, job.model, cfg, metrics, n_total, {**settings, **extra}, notes, t0,
                              device, skipped=skipped, world_size=dist.world_size)
            if dist.is_main:
                write_record(rec, job.path)
            if os.path.isfile(job.partial):
                os.remove(job.partial)
            records[job.index] = rec
        dist.barrier()  # the records are on disk before any rank returns

    # -- set-up --------------------------------------------------------------------------------------
    @staticmethod
    def _pearson_setup(res: Resolved, base, cfg: RunConfig, device: torch.device) -> _Pearson:
        """The ovss protocol's settings for this dataset, its name set and the text queries."""
        ovss = get_protocol("ovss", str(res.settings["ovss_protocol"]))
        if ovss.task != "ovss":
            raise ConfigError(f"{res.where}: ovss_protocol {ovss.path} is a {ovss.task!r} protocol, not ovss")
        pinned = res.settings.get("ovss_protocol_version")
        if pinned is not None and int(pinned) != ovss.version:
            raise ConfigError(f"{res.where} pins ovss protocol {ovss.key} at v{pinned}, but {ovss.path} is "
                              f"v{ovss.version}: bump the artifacts protocol's version and its ovss_protocol_version "
                              f"together, so that records of the old Pearson settings are not reused")
        st = ovss.settings(res.dataset)
        names = load_name_set(st["name_set"], res.spec.key)
        check_class_count(names, res.spec.num_classes, f"name set {st['name_set']!r} for {res.dataset}")
        text = class_queries(base, names, st["templates"], device, cfg.cache_dir)
        return _Pearson(st, ovss.id, ovss.version, text, res.spec.num_classes)

    @staticmethod
    def _items(res: Resolved, cfg: RunConfig, pear: Optional[_Pearson], size: int, bspec
               ) -> Tuple[_Items, List[Dict[str, str]]]:
        """The images to measure and the bad ones ``--on-bad-image skip`` left out (screened before any work)."""
        spec = res.spec
        if not getattr(spec, "labelled", True):
            paths, skipped = screen_images(spec.image_paths(cfg.data_root, cfg.limit), cfg.on_bad_image, spec.name)
            return _Items(paths, None, size, bspec.mean, bspec.std), skipped
        ds = spec.build(cfg.data_root, cfg.split, mmseg_pipeline(pear.settings) if pear else [], limit=cfg.limit,
                        on_bad_image=cfg.on_bad_image)
        return _Items(None, ds, size, bspec.mean, bspec.std), skipped_samples(ds)

    # -- the pass ----------------------------------------------------------------------------------
    def _loop(self, loader, jobs: List[_Job], views: List[View], settings: Dict[str, Any], pear: Optional[_Pearson],
              bar, device: torch.device, bs: int, done: int, n_total: int, non_blocking: bool = False) -> None:
        """Measure every image of ``loader`` for every method; saves partial state periodically and on Ctrl-C."""
        base = jobs[0].model
        features = shared_trunk_features([j.model for j in jobs], settings["precision"])
        patch = base.spec.patch_size
        fill = (1.0 - torch.tensor(base.spec.mean)) / torch.tensor(base.spec.std)
        cutoff = float(settings["outlier_cutoff"])
        last_save = time.time()
        try:
            with torch.inference_mode():
                for batch in loader:
                    # each (pinned) image copied as it is, stacked on the device: a host-side stack would be unpinned
                    x = torch.stack([it["image"].to(device, non_blocking=non_blocking) for it in batch])
                    b = x.shape[0]
                    stacked = torch.cat([apply_view(x, v, patch, fill) for v in views])
                    chunks = [features(stacked[i:i + bs]) for i in range(0, stacked.shape[0], bs)]
                    per_job = [torch.cat([c[m] for c in chunks]) for m in range(len(jobs))]
                    updates: List[Tuple[torch.Tensor, torch.Tensor]] = []
                    for feats in per_job:
                        per_view = [feats[k * b:(k + 1) * b] for k in range(len(views))]
                        updates.append((per_view[0], view_target(per_view, views)))
                    scores = self._pearson(batch, jobs, features, pear, base, device, bs) if pear else None
                    # all methods' numbers first, then all states together: a Ctrl-C leaves them at `done`
                    for j, (job, (own, target)) in enumerate(zip(jobs, updates)):
                        job.stats.add_tokens(own, target, cutoff)
                        for s in (scores[j] if scores is not None else ()):
                            job.stats.add_pearson(s)
                    done += b
                    bar.update(b)
                    if time.time() - last_save > CHECKPOINT_EVERY_S:
                        _save_partials(jobs, done, n_total)
                        last_save = time.time()
        except KeyboardInterrupt:
            _save_partials(jobs, done, n_total)
            raise

    @staticmethod
    def _pearson(batch: List[dict], jobs: List[_Job], features, pear: _Pearson, base, device: torch.device,
                 bs: int) -> List[List[Optional[float]]]:
        """Per method, per image: Table S.4's score of the OVSS query maps at label resolution."""
        st = pear.settings
        mean = torch.tensor(base.spec.mean_255, device=device).view(3, 1, 1)
        std = torch.tensor(base.spec.std_255, device=device).view(3, 1, 1)
        images = [ImageJob(normalise(it["ovss"]["img"], mean, std, device),
                           tuple(int(v) for v in it["ovss"]["ori_shape"][:2])) for it in batch]
        logits = dense_logits(features, images, pear.text.embeddings, st["mode"], int(st["crop"]), int(st["stride"]),
                              bs)
        out: List[List[Optional[float]]] = []
        for per_image in logits:
            vals: List[Optional[float]] = []
            for it, image, lg in zip(batch, images, per_image):
                if st.get("pamr"):
                    img = torch.nn.functional.interpolate(image.image[None], size=image.ori_size, mode="bilinear")
                    lg = pamr(img, lg[None], int(st["pamr"]["steps"]), tuple(st["pamr"]["dilations"]))[0]
                gt = torch.from_numpy(np.asarray(it["ovss"]["gt_seg_map"]).astype(np.int64)).to(lg.device)
                vals.append(pearson_with_onehot(class_maps(lg.float(), pear.text.query_class, pear.num_classes), gt))
            out.append(vals)
        return out


def _load_partials(jobs: List[_Job], n_total: int) -> int:
    """Resume point: images already measured by every method of the pass (0 unless all partials agree)."""
    states = []
    for job in jobs:
        if not os.path.isfile(job.partial):
            return 0
        st = torch.load(job.partial, map_location="cpu", weights_only=True)
        # ``done`` counts images of this rank's share, which depends on the number of ranks
        if st.get("key") != job.key or st.get("num_images") != n_total or \
                int(st.get("world_size", 1)) != job.world_size:
            return 0
        states.append(st)
    if len({int(st["done"]) for st in states}) != 1:
        return 0
    for job, st in zip(jobs, states):
        job.stats = ArtifactStats.from_state_dict(st["stats"])
    return int(states[0]["done"])


def _save_partials(jobs: List[_Job], done: int, n_total: int) -> None:
    for job in jobs:
        os.makedirs(os.path.dirname(job.partial), exist_ok=True)
        tmp = job.partial + ".tmp"
        torch.save({"key": job.key, "done": done, "num_images": n_total, "world_size": job.world_size,
                    "stats": job.stats.state_dict()}, tmp)
        os.replace(tmp, job.partial)
