"""One JSON record per run, with everything needed to trace a leaderboard cell back to its origin.

Records live under ``<results_dir>/runs/<task>/<protocol>/`` and are named by a hash of what makes the
run unique (task, protocol+version, backbone, weights, method+params, method-weights hashes, dataset, split,
limit), so a re-run of the same configuration finds its finished record and is skipped unless ``--force``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

SCHEMA_VERSION = 1


def harness_version() -> str:
    from .. import __version__

    return __version__


def git_hash() -> str:
    """Commit of the harness checkout (``+dirty`` when modified), or ``unknown`` outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class RunRecord:
    """The result of one (task, protocol, backbone, method, dataset) run."""

    task: str  # "ovss" | "linear-seg" | "depth"
    protocol: str
    protocol_version: int
    backbone: str
    weights: str  # sha256 of the weights file, or "random-init"
    method: str  # a registered method or a composition such as "ttr+naclip"
    method_params: Dict[str, Any]
    dataset: str
    split: str
    data_root: str
    num_images: int
    metrics: Dict[str, float]  # headline metrics, e.g. mIoU/mAcc/aAcc (x100) or rmse/abs_rel/delta1
    per_class: Dict[str, Dict[str, float]] = field(default_factory=dict)  # class -> {IoU, Acc}
    settings: Dict[str, Any] = field(default_factory=dict)  # the resolved protocol entry used
    notes: List[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    device: str = ""
    world_size: int = 1
    harness_version: str = field(default_factory=harness_version)
    git_hash: str = field(default_factory=git_hash)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    environment: Dict[str, str] = field(default_factory=lambda: environment())
    schema_version: int = SCHEMA_VERSION
    method_weights: Dict[str, str] = field(default_factory=dict)  # method part -> sha256 of its weights file
    #: True when images were left out (``--on-bad-image skip``): not comparable with a full run
    partial: bool = False
    #: the samples left out: {"image", "label", "reason"}
    skipped_images: List[Dict[str, str]] = field(default_factory=list)

    @property
    def random_init(self) -> bool:
        return self.weights == "random-init"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False, default=_jsonable)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunRecord":
        known = {f for f in cls.__dataclass_fields__}  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in d.items() if k in known})


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def environment() -> Dict[str, str]:
    env = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = str(torch.version.cuda)
    except ImportError:  # pragma: no cover
        pass
    return env


def run_key(task: str, protocol: str, protocol_version: int, backbone: str, weights: str, method: str,
            method_params: Dict[str, Any], dataset: str, split: str, limit: Optional[int], data_root: str = "",
            seed: int = 0, method_weights: Optional[Dict[str, str]] = None, on_bad_image: str = "fail") -> str:
    """A short stable hash of everything that makes a run unique (the data folder, seed and method-weights
    hashes included, so a run pointed at other files, trained with another seed or given other method
    weights never picks up this run's record or state)."""
    parts: list = [task, protocol, protocol_version, backbone, weights, method, method_params, dataset, split, limit]
    if data_root:
        parts.append(os.path.abspath(data_root))
    if seed:
        parts.append(f"seed={seed}")
    if method_weights:  # absent for training-free methods, so their keys are those of earlier versions
        parts.append({"method_weights": dict(sorted(method_weights.items()))})
    if on_bad_image != "fail":  # a run that may skip images never shares a record with one that may not
        parts.append(f"on_bad_image={on_bad_image}")
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def record_path(results_dir: str, task: str, protocol: str, backbone: str, method: str, dataset: str,
                key: str) -> str:
    return os.path.join(results_dir, "runs", task, protocol, f"{backbone}__{method}__{dataset}__{key}.json")


def write_record(rec: RunRecord, path: str) -> str:
    """Atomically write ``rec`` to ``path``: a crash, a full disk or a second writer never leaves a torn record
    (:func:`harness.io_safety.atomic_write`; a failure is a :class:`~harness.errors.StorageError` naming it)."""
    from ..io_safety import atomic_write_text

    return atomic_write_text(path, rec.to_json(), "run record")


def read_record(path: str) -> RunRecord:
    """A record file, or a :class:`~harness.errors.DataError` naming it when it is not a record."""
    from ..errors import DataError

    try:
        with open(path, encoding="utf-8") as f:
            return RunRecord.from_dict(json.load(f))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise DataError(f"run record {path} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        f"; expected a JSON run record: delete it to re-run that configuration") from e


def load_records(results_dir: str) -> List[RunRecord]:
    out = []
    root = os.path.join(results_dir, "runs")
    for dirpath, _, files in os.walk(root):
        for fn in sorted(files):
            if fn.endswith(".json"):
                out.append(read_record(os.path.join(dirpath, fn)))
    return out
