"""What both probe evaluators share: the probe run on the common lifecycle, artifacts, settings checks.

Artifacts of a run live next to its record ``<stem>.json``:

* ``<stem>.ckpt.pt``      resumable training state (removed when the record is written)
* ``<stem>.head.pt``      the final (selected) head's weights
* ``<stem>.curves.csv``   training loss / lr and validation metrics per head (see ``probes/curves.py``)
* ``<stem>.curves.png``   the same, plotted
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError
from ..io_safety import file_lock
from ..methods.base import DenseModel
from ..probes.cache import FeatureCache, cache_dir_name
from ..probes.common import dataset_fingerprint, require, weights_identity
from ..probes.heads import HeadBank
from ..probes.schedules import Schedule
from ..probes.trainer import ProbeTrainer
from ..protocols import Protocol
from ..registry import DATASETS
from ..results.record import RunRecord, write_record
from ..runtime import Dist, init_distributed, select_device
from .base import (
    Evaluator,
    Identity,
    Resolved,
    RunConfig,
    build_models,
    finished,
    identify,
    make_record,
    resolve,
    skipped_samples,
)

MODES = ("faithful", "fast")


@dataclass
class ProbeRun:
    """One probe run: its protocol, model, identity, paths and the notes that go into the record."""

    cfg: RunConfig
    task: str
    res: Resolved
    protocol: Protocol
    settings: Dict[str, Any]
    dataset: str
    eval_split: str
    model: DenseModel
    device: torch.device
    key: str
    path: str
    existing: Optional[RunRecord] = None
    notes: List[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    _weights_identity: Optional[str] = None
    #: samples ``--on-bad-image skip`` left out of the datasets this run built (see :meth:`build`)
    skipped: List[Dict[str, str]] = field(default_factory=list)
    #: the torchrun job: ranks split each global batch; rank 0 writes the record and artifacts
    dist: Dist = field(default_factory=Dist)

    def build(self, spec: Any, split: str, pipeline: Sequence[dict]) -> Any:
        """``spec.build`` with the run's ``--limit`` and ``--on-bad-image``; what it skips joins the record."""
        ds = spec.build(self.cfg.data_root, split, pipeline, limit=self.cfg.limit, on_bad_image=self.cfg.on_bad_image)
        self.skipped += [s for s in skipped_samples(ds) if s not in self.skipped]
        return ds

    @property
    def weights_identity(self) -> str:
        """:func:`weights_identity` of the model, computed once (hashing a random ViT-L takes seconds)."""
        if self._weights_identity is None:
            self._weights_identity = weights_identity(self.model)
        return self._weights_identity

    @property
    def mode(self) -> str:
        return str(self.settings["mode"])

    @property
    def stem(self) -> str:
        return self.path[: -len(".json")]

    def artifact(self, suffix: str) -> str:
        """Path of an artifact beside the record; its folder exists (a run shorter than its checkpoint
        interval writes its first file here)."""
        os.makedirs(os.path.dirname(self.stem) or ".", exist_ok=True)
        return f"{self.stem}.{suffix}"

    @property
    def where(self) -> str:
        return f"{self.protocol.key} v{self.protocol.version} ({self.protocol.path})"

    def fingerprint(self, extra: Dict[str, Any]) -> str:
        """Identifies the training configuration: a checkpoint with another fingerprint is not resumed."""
        blob = json.dumps({"key": self.key, "settings": self.settings, "seed": self.cfg.seed,
                           "weights": self.weights_identity, **extra}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def cache_root(self) -> str:
        return self.cfg.cache_dir or os.path.join(self.cfg.results_dir, "cache")

    def cache_fields(self, split: str, view: str, ds: Any, extra: Dict[str, Any]) -> Dict[str, Any]:
        """What a feature cache's content depends on (backbone, method, weights hash,
        dataset, resolution, precision), plus the data files themselves (:func:`dataset_fingerprint`)."""
        fields = {"backbone": self.model.spec.id, "method": self.method_name, "method_params": self.model.params,
                  "weights": self.weights_identity, "dataset": self.dataset, "split": split, "view": view,
                  "data_root": os.path.abspath(self.cfg.data_root), "limit": self.cfg.limit,
                  "files": dataset_fingerprint(ds), **extra}
        if self.settings.get("precision", "fp32") != "fp32":  # only when not the reference: fp32 caches keep names
            fields["precision"] = self.settings["precision"]
        if self.model.method_weights:  # only when present: caches of training-free methods keep their names
            fields["method_weights"] = dict(sorted(self.model.method_weights.items()))
        return fields

    def open_cache(self, split: str, view: str, ds: Any, extra: Dict[str, Any], arrays: Dict[str, str]
                   ) -> FeatureCache:
        """The feature cache of one (split, view) of this run: its folder is named by :meth:`cache_fields`."""
        fields = self.cache_fields(split, view, ds, extra)
        return FeatureCache(os.path.join(self.cache_root, cache_dir_name(fields)), fields, arrays)

    def derived_cache(self, src: FeatureCache, what: str, params: Dict[str, Any], arrays: Dict[str, str]
                      ) -> FeatureCache:
        """A cache of per-item values computed from ``src`` (e.g. training targets on the token grid): same
        items and key as ``src`` plus ``what`` and ``params``, in a folder of its own beside it."""
        fields = {**src.key_fields, "view": f"{src.key_fields.get('view', '')}+{what}",
                  "derived": {"what": what, **params}}
        return FeatureCache(os.path.join(self.cache_root, cache_dir_name(fields)), fields, arrays)

    @property
    def method_name(self) -> str:
        return self.model.name

    def inference_batch(self, default_gpu: int, default_cpu: int) -> int:
        """Images (or windows) per backbone forward: ``--batch-size`` or a device default (no effect on numbers)."""
        return int(self.cfg.batch_size) or (default_gpu if self.device.type == "cuda" else default_cpu)

    def finish(self, metrics: Dict[str, float], num_images: int, settings_extra: Dict[str, Any],
               per_class: Optional[Dict[str, Dict[str, float]]] = None) -> RunRecord:
        """Write the record (atomically, rank 0 only), drop the checkpoint, return the record."""
        notes = list(self.notes)
        if self.cfg.limit:
            notes.append(f"limit={self.cfg.limit}: only the first {self.cfg.limit} images of each split were used")
        rec = make_record(self.task, self.res, self.model, self.cfg, metrics, num_images,
                          {**self.settings, "seed": self.cfg.seed, "limit": self.cfg.limit, **settings_extra},
                          notes, self.started, self.device, per_class=per_class, skipped=self.skipped,
                          world_size=self.dist.world_size)
        if not self.dist.is_main:
            return rec
        write_record(rec, self.path)
        ckpt = self.artifact("ckpt.pt")
        if os.path.isfile(ckpt):
            os.remove(ckpt)
        return rec


def start_probe_run(cfg: RunConfig, task: str, default_eval_split: str) -> ProbeRun:
    """Steps 1-4 of the run lifecycle (:mod:`harness.evaluators.base`) for a probe: resolve, build the
    model, identify the run, and find its finished record (unless --force)."""
    dist = init_distributed()
    res = resolve(cfg, task, [cfg.method], default_split=default_eval_split)
    require(res.settings, ("mode",), res.where)
    if res.settings["mode"] not in MODES:
        raise ConfigError(f"protocol {res.where}: mode {res.settings['mode']!r} must be one of {', '.join(MODES)}")
    device = select_device(cfg.device, dist)
    model = build_models(cfg, res.methods, device)[0]
    ident = identify(task, res, model, cfg, seed=True)
    run = ProbeRun(cfg=cfg, task=task, res=res, protocol=res.protocol, settings=res.settings, dataset=res.dataset,
                   eval_split=res.split, model=model, device=device, key=ident.key, path=ident.path, dist=dist)
    run.existing = finished(ident, cfg)
    return run


class ProbeEvaluator(Evaluator):
    """What the linear-seg and depth evaluators share: optimiser settings, the trainer and its curves."""

    task: str = ""
    #: whose probe optimiser the protocol must name, for the error message
    optimiser_source: str = ""
    default_eval_split: str = "val"
    #: protocol settings every run needs, and those of each mode
    common_keys: Sequence[str] = ()
    faithful_keys: Sequence[str] = ()
    fast_keys: Sequence[str] = ()
    #: values of the ``fast`` protocols' optional ``train_loss`` setting; the first (v1's full-resolution
    #: loss) applies when a protocol file has none, so a version-1 file keeps meaning what it meant
    fast_train_losses: Sequence[str] = ("pixel",)
    #: modes that train under torchrun (the global batch split over the ranks, gradients averaged, BatchNorm
    #: statistics over the global batch); the others refuse a torchrun launch
    ddp_modes: Sequence[str] = ()

    def run(self, cfg: RunConfig) -> RunRecord:
        """Resolve the run, skip it if finished, check the protocol and dataset, then train and test."""
        run = start_probe_run(cfg, self.task, default_eval_split=self.default_eval_split)
        if run.existing is not None:
            return run.existing
        if run.dist.world_size > 1 and run.mode not in self.ddp_modes:
            raise ConfigError(f"the {self.task} probe's {run.mode} mode runs in one process (the global batch on one "
                              f"device); launch it without torchrun"
                              + (f" (modes that run under torchrun: {', '.join(self.ddp_modes)})"
                                 if self.ddp_modes else ""))
        if not run.dist.is_main:  # rank 0 holds the lock; the ranks meet in the collectives
            return self._train_and_test(run)
        with file_lock(run.path, "run record"):  # a second run of the same configuration waits, then reads it
            run.existing = finished(Identity(run.key, run.path), cfg)
            if run.existing is not None:
                return run.existing
            return self._train_and_test(run)

    def _train_and_test(self, run: "ProbeRun") -> RunRecord:
        from ..probes.data import register_transforms

        mode_keys = self.faithful_keys if run.mode == "faithful" else self.fast_keys
        require(run.settings, tuple(self.common_keys) + tuple(mode_keys), run.where)
        register_transforms()
        spec = DATASETS.get(run.dataset)
        self._check_dataset(run, spec)
        train_split = str(run.settings["train_split"])
        if train_split not in spec.splits:
            raise ConfigError(f"protocol {run.where}: dataset {run.dataset!r} has no split {train_split!r}")
        if run.mode == "faithful":
            if str(run.settings.get("train_loss", "pixel")) != "pixel":
                raise ConfigError(f"protocol {run.where}: train_loss {run.settings['train_loss']!r} is a fast "
                                  f"setting; the faithful recipe trains at full resolution (remove it)")
            return self._faithful(run, spec, train_split)
        return self._fast(run, spec, train_split)

    def _check_dataset(self, run: "ProbeRun", spec: Any) -> None:
        """Raise :class:`ConfigError` when ``spec`` does not suit this probe or the protocol's settings."""

    def _faithful(self, run: "ProbeRun", spec: Any, train_split: str) -> RunRecord:
        raise NotImplementedError

    def _fast(self, run: "ProbeRun", spec: Any, train_split: str) -> RunRecord:
        raise NotImplementedError

    def _train_loss(self, run: "ProbeRun") -> str:
        """The ``fast`` protocol's ``train_loss`` (where the training loss is computed), checked."""
        value = str(run.settings.get("train_loss", self.fast_train_losses[0]))
        if value not in self.fast_train_losses:
            raise ConfigError(f"protocol {run.where}: train_loss {value!r} must be one of "
                              f"{', '.join(self.fast_train_losses)}")
        return value

    def _optim(self, run: "ProbeRun") -> Tuple[List[float], float, Tuple[float, float], Any]:
        o = run.settings["optimizer"]
        if str(o.get("type", "AdamW")) != "AdamW":
            raise ConfigError(f"protocol {run.where}: optimizer.type must be AdamW ({self.optimiser_source})")
        lrs = o.get("lrs") or [o["lr"]]
        return ([float(x) for x in lrs], float(o["weight_decay"]), (float(o["betas"][0]), float(o["betas"][1])),
                o.get("grad_clip"))

    def _trainer(self, run: "ProbeRun", heads: HeadBank, names: List[str], lrs: List[float],
                 fp_extra: Dict[str, Any], desc: str) -> ProbeTrainer:
        s = run.settings
        _, wd, betas, clip = self._optim(run)
        kill = run.cfg.extra.get("kill_after_iters")  # test hook: abandon the run like SIGKILL
        if run.dist.world_size > 1:  # mmseg's SyncBN: statistics of the global batch, not of a rank's slice
            from ..probes.sync_bn import globalize_batchnorm

            globalize_batchnorm(heads)
        # depth protocols state the one-cycle momentum numbers (onecycle_momentum); linear-seg uses mmcv's defaults
        schedule = Schedule(s["schedule"], int(s["max_iters"]), s.get("onecycle_momentum"))
        return ProbeTrainer(heads, names, lrs, wd, betas, clip, schedule,
                            int(s["max_iters"]), run.artifact("ckpt.pt"), run.fingerprint(fp_extra),
                            int(s["checkpoint_interval"]), int(s["log_interval"]), progress=run.cfg.progress,
                            desc=desc, kill_after=int(kill) if kill is not None else None, dist=run.dist)

    def _write_curves(self, run: "ProbeRun", trainer: ProbeTrainer) -> Dict[str, str]:
        """Loss and validation curves as CSV and PNG next to the record (written by rank 0)."""
        if not run.dist.is_main:
            return {"curves_csv": run.artifact("curves.csv"), "curves_png": run.artifact("curves.png")}
        title = f"{self.task}/{run.protocol.id} {run.model.spec.id} {run.method_name} {run.dataset}"
        return {"curves_csv": trainer.curves.write_csv(run.artifact("curves.csv")),
                "curves_png": trainer.curves.plot(run.artifact("curves.png"), title)}
