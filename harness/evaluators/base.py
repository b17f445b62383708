"""Evaluator interface and the one run lifecycle every task shares.

A run goes through the same steps whatever the task (``ovss``, ``linear-seg``, ``depth``):

1. :func:`resolve` -- names (backbone, method or composition, dataset) checked before any work, the
   protocol and its per-dataset settings, the split;
2. :func:`build_models` -- one backbone (weights resolved and hashed) with each method attached
   (method weights resolved and hashed);
3. :func:`identify` -- the run key and record path from everything that identifies the run;
4. :func:`finished` -- a finished record is read back instead of recomputed (unless ``--force``);
5. the task's own work, which resumes its partial state (OVSS accumulators, probe checkpoints);
6. :func:`make_record` -- the record with every identifying field, written atomically by the task.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..datasets.safety import ON_BAD_IMAGE
from ..errors import ConfigError
from ..io_safety import ensure_writable_dir, file_lock
from ..methods.base import DenseModel, split_composition
from ..models import attach_method, build_dense_model, canonical_method
from ..profiling import StageTimer
from ..protocols import Protocol, get_protocol
from ..registry import BACKBONES, DATASETS, METHODS
from ..results.record import RunRecord, read_record, record_path, run_key
from ..runtime import device_description


@dataclass
class RunConfig:
    """Everything a run needs; the CLI fills it from its options."""

    task: str
    backbone: str
    method: str
    dataset: str
    data_root: str
    method_params: Dict[str, Any] = field(default_factory=dict)
    split: str = "val"
    protocol: Optional[str] = None  # name or YAML path; None = the task's default
    weights: Optional[str] = None  # --weights FILE
    method_weights: Any = None  # --method-weights: FILE or {part: FILE}
    random_init: bool = False
    allow_download: bool = False
    device: str = "auto"
    batch_size: int = 0  # 0 = the evaluator's default
    num_workers: int = 2
    limit: Optional[int] = None  # first N images (smoke runs); recorded, never mixed with full runs
    results_dir: str = "results"
    cache_dir: Optional[str] = None
    force: bool = False
    seed: int = 0
    progress: bool = True
    save_predictions: Optional[str] = None  # folder for per-image prediction PNGs (label indices)
    on_bad_image: str = "fail"  # "skip": leave unreadable samples out, list them, mark the record partial
    extra: Dict[str, Any] = field(default_factory=dict)
    profiler: Optional[StageTimer] = None  # --profile: stage timings, printed and stored in the record (ovss)


@dataclass
class Resolved:
    """Step 1 of a run: canonical names, protocol, its settings for the dataset, the dataset spec, split."""

    task: str
    protocol: Protocol
    settings: Dict[str, Any]
    dataset: str
    spec: Any
    split: str
    methods: List[str]

    @property
    def where(self) -> str:
        return f"{self.protocol.key} v{self.protocol.version} ({self.protocol.path})"


def resolve(cfg: RunConfig, task: str, methods: Sequence[str], default_split: Optional[str] = None) -> Resolved:
    """Check names and load the protocol. ``default_split`` replaces ``cfg.split`` when the dataset lacks
    it and the user did not choose it (NYU has train/test, the CLI's default split is val)."""
    BACKBONES.get(cfg.backbone)  # unknown names fail before any work
    if cfg.on_bad_image not in ON_BAD_IMAGE:
        raise ConfigError(f"--on-bad-image {cfg.on_bad_image!r}: expected one of {', '.join(ON_BAD_IMAGE)}")
    ensure_writable_dir(cfg.results_dir, "results folder", "--results-dir")  # read-only: fail now, not at the end
    canonical = [canonical_method(m) for m in methods]
    protocol = get_protocol(task, cfg.protocol)
    if protocol.task != task:
        raise ConfigError(f"protocol file {protocol.path} is for task {protocol.task!r}, not {task!r}")
    dataset = DATASETS.canonical(cfg.dataset)
    spec = DATASETS.get(dataset)
    split = cfg.split
    if default_split is not None and split not in spec.splits:
        if cfg.split != "val":
            raise ConfigError(f"dataset {dataset!r} has no split {cfg.split!r}; use one of {', '.join(spec.splits)}")
        split = default_split
    return Resolved(task=task, protocol=protocol, settings=protocol.settings(dataset), dataset=dataset, spec=spec,
                    split=split, methods=canonical)


def _parts(method: str) -> List[str]:
    return [METHODS.canonical(p) for p in split_composition(method)]


def options_per_method(methods: Sequence[str], params: Dict[str, Any], method_weights: Any
                       ) -> List[Tuple[Dict[str, Any], Any]]:
    """``--param`` and ``--method-weights`` of a pass, given to each method that has the part they name.

    With one method everything goes to it (it reports what it cannot use). With several, ``NAME=VALUE``
    goes to the methods with a part that declares ``NAME`` (``part.NAME`` picks the part), a bare
    ``--method-weights FILE`` to every method with a weighted part, ``PART=FILE`` to those containing PART;
    an option no method of the pass can use is an error.
    """
    if len(methods) == 1:
        return [(dict(params), method_weights)]
    out: List[Tuple[Dict[str, Any], Any]] = []
    used: set = set()
    for m in methods:
        parts = _parts(m)
        mine: Dict[str, Any] = {}
        for key, value in params.items():
            part, _, name = key.rpartition(".")
            if METHODS.canonical(part) in parts if part else any(name in METHODS.get(p).PARAMS for p in parts):
                mine[key] = value
                used.add(key)
        weighted = [p for p in parts if METHODS.get(p).WEIGHTS]
        if method_weights is None or not weighted:
            mw: Any = None
        elif isinstance(method_weights, str):
            mw = method_weights
            used.add("--method-weights")
        else:
            mw = {k: v for k, v in method_weights.items() if k in parts} or None
            used.update(f"--method-weights {k}" for k in (mw or {}))
        out.append((mine, mw))
    unused = [k for k in params if k not in used]
    if isinstance(method_weights, str) and "--method-weights" not in used:
        unused.append(f"--method-weights {method_weights}")
    elif isinstance(method_weights, dict):
        unused += [f"--method-weights {k}={v}" for k, v in method_weights.items()
                   if f"--method-weights {k}" not in used]
    if unused:
        raise ConfigError(f"{', '.join(unused)}: no method of {', '.join(methods)} takes it")
    return out


def build_models(cfg: RunConfig, methods: Sequence[str], device: torch.device) -> List[DenseModel]:
    """One backbone, each method attached to it (so a multi-method pass can share its trunk)."""
    opts = options_per_method(methods, cfg.method_params, cfg.method_weights)
    base = build_dense_model(cfg.backbone, methods[0], opts[0][0], cfg.weights, opts[0][1], cfg.random_init,
                             cfg.allow_download).to(device)
    return [base] + [attach_method(base.backbone, m, p, w).to(device) for m, (p, w) in zip(methods[1:], opts[1:])]


@dataclass
class Identity:
    """Step 3: what names a run: its key (hash of every identifying field) and its record path."""

    key: str
    path: str


def identify(task: str, res: Resolved, model: DenseModel, cfg: RunConfig, seed: bool = False) -> Identity:
    """Run key and record path of ``model`` under ``res`` (``seed`` joins the key for trained probes)."""
    key = run_key(task, res.protocol.id, res.protocol.version, model.spec.id, model.backbone.weights_id,
                  model.name, model.params, res.dataset, res.split, cfg.limit, data_root=cfg.data_root,
                  seed=cfg.seed if seed else 0, method_weights=model.method_weights,
                  on_bad_image=cfg.on_bad_image)
    return Identity(key, record_path(cfg.results_dir, task, res.protocol.id, model.spec.id, model.name, res.dataset,
                                     key))


def finished(ident: Identity, cfg: RunConfig) -> Optional[RunRecord]:
    """Step 4: the finished record of this run, unless ``--force`` asks for a new one."""
    if os.path.isfile(ident.path) and not cfg.force:
        return read_record(ident.path)
    return None


@contextlib.contextmanager
def claimed(jobs: List[Any], cfg: RunConfig, records: Dict[int, RunRecord], enabled: bool = True) -> Iterator[None]:
    """Hold the record lock of every job (``.key``, ``.path``, ``.index``) for the block; a job that another run
    finished meanwhile is read back into ``records`` and removed from ``jobs``, so a second identical run waits
    and then reuses the first one's records instead of recomputing them (locks taken in path order)."""
    with contextlib.ExitStack() as locks:
        if enabled:
            for job in sorted(jobs, key=lambda j: j.path):
                locks.enter_context(file_lock(job.path, "run record"))
            for job in list(jobs):
                done = finished(Identity(job.key, job.path), cfg)
                if done is not None:
                    records[job.index] = done
                    jobs.remove(job)
        yield


def make_record(task: str, res: Resolved, model: DenseModel, cfg: RunConfig, metrics: Dict[str, float],
                num_images: int, settings: Dict[str, Any], notes: Sequence[str], started: float,
                device: torch.device, per_class: Optional[Dict[str, Dict[str, float]]] = None,
                world_size: int = 1, skipped: Sequence[Dict[str, str]] = ()) -> RunRecord:
    """Step 6: a record carrying everything that identifies the run (weights and method-weights hashes);
    ``skipped`` (see :func:`skipped_samples`) marks it partial."""
    notes = list(notes)
    if cfg.random_init or model.backbone.weights_id == "random-init":
        notes.append("random-init weights: numbers are not meaningful")
    if skipped:
        notes.append(f"partial: {len(skipped)} bad sample(s) skipped (--on-bad-image skip), see skipped_images")
    return RunRecord(
        partial=bool(skipped), skipped_images=[dict(s) for s in skipped],
        task=task, protocol=res.protocol.id, protocol_version=res.protocol.version, backbone=model.spec.id,
        weights=model.backbone.weights_id, method=model.name, method_params=model.params,
        method_weights=dict(model.method_weights), dataset=res.dataset, split=res.split,
        data_root=os.path.abspath(cfg.data_root), num_images=int(num_images), metrics=metrics,
        per_class=per_class or {}, settings={**settings, "method_config": model.describe()["config"]}, notes=notes,
        wall_time_s=time.time() - started, device=device_description(device), world_size=world_size)


def skipped_samples(*datasets: Any) -> List[Dict[str, str]]:
    """The samples ``--on-bad-image skip`` left out of datasets built by ``DatasetSpec.build``."""
    out: List[Dict[str, str]] = []
    for ds in datasets:
        out += [s for s in getattr(ds, "harness_skipped", ()) if s not in out]
    return out


class Evaluator:
    """Base class of registered evaluators (``EVALUATORS``); the registry name is the task name."""

    def run(self, cfg: RunConfig) -> RunRecord:
        raise NotImplementedError

    def run_methods(self, cfg: RunConfig, methods: Sequence[str]) -> List[RunRecord]:
        """Several methods of one backbone; evaluators that share work across them override this."""
        out = []
        for m in methods:
            one = RunConfig(**{**cfg.__dict__, "method": m})
            out.append(self.run(one))
        return out
