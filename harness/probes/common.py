"""What both probe evaluators share: run identity, skip/resume bookkeeping, artifacts, settings checks.

Artifacts of a run live next to its record ``<stem>.json``:

* ``<stem>.ckpt.pt``      resumable training state (removed when the record is written)
* ``<stem>.head.pt``      the final (selected) head's weights
* ``<stem>.curves.csv``   training loss / lr and validation metrics per head (see ``curves.py``)
* ``<stem>.curves.png``   the same, plotted
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..backbones.base import DenseModel
from ..errors import ConfigError
from ..evaluators.base import Evaluator, RunConfig
from ..models import build_dense_model
from ..protocols import Protocol, get_protocol
from ..registry import BACKBONES, DATASETS, METHODS
from ..results.record import RunRecord, read_record, record_path, run_key, write_record
from ..runtime import device_description, select_device
from .cache import FeatureCache, cache_dir_name
from .heads import HeadBank
from .schedules import Schedule
from .trainer import ProbeTrainer

MODES = ("faithful", "fast")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a block (head initialisation) and restore the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def weights_identity(model: DenseModel) -> str:
    """The weights hash, or for ``random-init`` a digest of the actual random tensors.

    Why: "random-init" names no particular tensors; a cache written by one random model must never be
    read with features of another (a family that does not seed its random init would otherwise mix them).
    """
    wid = str(model.backbone.weights_id)
    if wid != "random-init":
        return wid
    h = hashlib.sha256()
    for name, t in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return "random-init:" + h.hexdigest()[:16]


def dataset_fingerprint(ds: Any) -> str:
    """Hash of an mmseg dataset's files (paths, sizes, modification times): a cache follows its data.

    Why: the cache is keyed by the data root, and a root can be re-prepared with other files in place.
    """
    h = hashlib.sha256()
    for i in range(len(ds)):
        info = ds.get_data_info(i)
        for key in ("img_path", "seg_map_path", "depth_map_path"):
            p = info.get(key)
            if p:
                try:
                    st = os.stat(p)
                    h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(f"{p}|missing\n".encode())
    return h.hexdigest()[:16]


def require(settings: Dict[str, Any], keys: Sequence[str], where: str) -> None:
    """Raise a :class:`ConfigError` naming the protocol file when settings lack ``keys``."""
    missing = [k for k in keys if k not in settings]
    if missing:
        raise ConfigError(f"protocol {where} lacks setting(s) {', '.join(missing)}; add them to the YAML file")


@dataclass
class ProbeRun:
    """One probe run: its protocol, model, identity, paths and the notes that go into the record."""

    cfg: RunConfig
    task: str
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
        """What a feature cache's content depends on (probes.md §4.2 / issue: backbone, method, weights hash,
        dataset, resolution), plus the data files themselves (:func:`dataset_fingerprint`)."""
        return {"backbone": self.model.spec.id, "method": self.method_name, "method_params": self.model.params,
                "weights": self.weights_identity, "dataset": self.dataset, "split": split, "view": view,
                "data_root": os.path.abspath(self.cfg.data_root), "limit": self.cfg.limit,
                "files": dataset_fingerprint(ds), **extra}

    def open_cache(self, split: str, view: str, ds: Any, extra: Dict[str, Any], arrays: Dict[str, str]
                   ) -> FeatureCache:
        """The feature cache of one (split, view) of this run: its folder is named by :meth:`cache_fields`."""
        fields = self.cache_fields(split, view, ds, extra)
        return FeatureCache(os.path.join(self.cache_root, cache_dir_name(fields)), fields, arrays)

    @property
    def method_name(self) -> str:
        return str(self.model.describe()["method"])

    def inference_batch(self, default_gpu: int, default_cpu: int) -> int:
        """Images (or windows) per backbone forward: ``--batch-size`` or a device default (no effect on numbers)."""
        return int(self.cfg.batch_size) or (default_gpu if self.device.type == "cuda" else default_cpu)

    def finish(self, metrics: Dict[str, float], num_images: int, settings_extra: Dict[str, Any],
               per_class: Optional[Dict[str, Dict[str, float]]] = None) -> RunRecord:
        """Write the record (atomically), drop the checkpoint, return the record."""
        notes = list(self.notes)
        if self.cfg.random_init or self.model.backbone.weights_id == "random-init":
            notes.append("random-init weights: numbers are not meaningful")
        if self.cfg.limit:
            notes.append(f"limit={self.cfg.limit}: only the first {self.cfg.limit} images of each split were used")
        rec = RunRecord(
            task=self.task, protocol=self.protocol.id, protocol_version=self.protocol.version,
            backbone=self.model.spec.id, weights=self.model.backbone.weights_id, method=self.method_name,
            method_params=self.model.params, dataset=self.dataset, split=self.eval_split,
            data_root=os.path.abspath(self.cfg.data_root), num_images=int(num_images), metrics=metrics,
            per_class=per_class or {},
            settings={**self.settings, "seed": self.cfg.seed, "limit": self.cfg.limit, **settings_extra},
            notes=notes, wall_time_s=time.time() - self.started, device=device_description(self.device),
            world_size=1)
        write_record(rec, self.path)
        ckpt = self.artifact("ckpt.pt")
        if os.path.isfile(ckpt):
            os.remove(ckpt)
        return rec


def start_probe_run(cfg: RunConfig, task: str, default_eval_split: str) -> ProbeRun:
    """Resolve protocol, dataset and model; compute the record path; find a finished record (unless --force).

    ``default_eval_split`` replaces ``cfg.split`` when the dataset has no such split (e.g. NYU has
    train/test and the CLI's default split is ``val``).
    """
    BACKBONES.get(cfg.backbone), METHODS.get(cfg.method)  # unknown names fail before any work
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"the {task} probe runs in one process (the global batch is on one device); "
                          f"launch it without torchrun")
    protocol = get_protocol(task, cfg.protocol)
    if protocol.task != task:
        raise ConfigError(f"protocol file {protocol.path} is for task {protocol.task!r}, not {task!r}")
    dataset = DATASETS.canonical(cfg.dataset)
    settings = protocol.settings(dataset)
    where = f"{protocol.key} v{protocol.version} ({protocol.path})"
    require(settings, ("mode",), where)
    if settings["mode"] not in MODES:
        raise ConfigError(f"protocol {where}: mode {settings['mode']!r} must be one of {', '.join(MODES)}")
    spec = DATASETS.get(dataset)
    eval_split = cfg.split
    if eval_split not in spec.splits:
        if cfg.split != "val":
            raise ConfigError(f"dataset {dataset!r} has no split {cfg.split!r}; use one of {', '.join(spec.splits)}")
        eval_split = default_eval_split
    device = select_device(cfg.device)
    model = build_dense_model(cfg.backbone, cfg.method, cfg.method_params, cfg.weights, cfg.random_init,
                              cfg.allow_download).to(device)
    method = str(model.describe()["method"])
    key = run_key(task, protocol.id, protocol.version, model.spec.id, model.backbone.weights_id, method,
                  model.params, dataset, eval_split, cfg.limit, data_root=cfg.data_root, seed=cfg.seed)
    path = record_path(cfg.results_dir, task, protocol.id, model.spec.id, method, dataset, key)
    run = ProbeRun(cfg=cfg, task=task, protocol=protocol, settings=settings, dataset=dataset, eval_split=eval_split,
                   model=model, device=device, key=key, path=path)
    if os.path.isfile(path) and not cfg.force:
        run.existing = read_record(path)
    return run


def lr_name(lr: float) -> str:
    """Name of a head in a learning-rate grid (``lr=0.001``)."""
    return f"lr={lr:g}"


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

    def run(self, cfg: RunConfig) -> RunRecord:
        """Resolve the run, skip it if finished, check the protocol and dataset, then train and test."""
        from .data import register_transforms

        run = start_probe_run(cfg, self.task, default_eval_split=self.default_eval_split)
        if run.existing is not None:
            return run.existing
        mode_keys = self.faithful_keys if run.mode == "faithful" else self.fast_keys
        require(run.settings, tuple(self.common_keys) + tuple(mode_keys), run.where)
        register_transforms()
        spec = DATASETS.get(run.dataset)
        self._check_dataset(run, spec)
        train_split = str(run.settings["train_split"])
        if train_split not in spec.splits:
            raise ConfigError(f"protocol {run.where}: dataset {run.dataset!r} has no split {train_split!r}")
        if run.mode == "faithful":
            return self._faithful(run, spec, train_split)
        return self._fast(run, spec, train_split)

    def _check_dataset(self, run: "ProbeRun", spec: Any) -> None:
        """Raise :class:`ConfigError` when ``spec`` does not suit this probe or the protocol's settings."""

    def _faithful(self, run: "ProbeRun", spec: Any, train_split: str) -> RunRecord:
        raise NotImplementedError

    def _fast(self, run: "ProbeRun", spec: Any, train_split: str) -> RunRecord:
        raise NotImplementedError

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
        return ProbeTrainer(heads, names, lrs, wd, betas, clip, Schedule(s["schedule"], int(s["max_iters"])),
                            int(s["max_iters"]), run.artifact("ckpt.pt"), run.fingerprint(fp_extra),
                            int(s["checkpoint_interval"]), int(s["log_interval"]), progress=run.cfg.progress,
                            desc=desc, kill_after=int(kill) if kill is not None else None)

    def _write_curves(self, run: "ProbeRun", trainer: ProbeTrainer) -> Dict[str, str]:
        """Loss and validation curves as CSV and PNG next to the record."""
        title = f"{self.task}/{run.protocol.id} {run.model.spec.id} {run.method_name} {run.dataset}"
        return {"curves_csv": trainer.curves.write_csv(run.artifact("curves.csv")),
                "curves_png": trainer.curves.plot(run.artifact("curves.png"), title)}
