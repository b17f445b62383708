"""Evaluator interface: a task family (ovss, linear-seg, depth) turned into one ``run`` call."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..results.record import RunRecord


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
    extra: Dict[str, Any] = field(default_factory=dict)


class Evaluator:
    """Base class of registered evaluators (``EVALUATORS``); the registry name is the task name."""

    def run(self, cfg: RunConfig) -> RunRecord:
        raise NotImplementedError
