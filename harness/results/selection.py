"""Which run records the leaderboard shows: one per cell, partial runs flagged, official split counts.

Why the rules: one cell = one (task, protocol id+version, backbone, weights, method+params, dataset,
split). When a cell has several records, a full run beats a partial one and then the newest
(``created``) wins, so re-running a configuration replaces its number instead of duplicating it. A run
is partial (``--limit``, or fewer images than the official split) and so not comparable with papers.
"""
from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from ..errors import HarnessError
from .record import RunRecord

OfficialCounts = Mapping[Tuple[str, str], int]  # (dataset, split) -> official number of images


def params_json(params: Mapping[str, Any]) -> str:
    """Method parameters as canonical JSON (sorted keys): part of a cell's identity and the CSV column."""
    return json.dumps(params or {}, sort_keys=True, default=str)


def _created(rec: RunRecord) -> _dt.datetime:
    try:
        t = _dt.datetime.fromisoformat(rec.created)
    except (TypeError, ValueError):
        return _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def _registry_count(dataset: str, split: str) -> Optional[int]:
    """Official image count of ``dataset``/``split`` from the dataset registry, when it is known there."""
    from ..registry import DATASETS, RegistryError

    try:
        entry = DATASETS.get(dataset)
    except (RegistryError, ImportError, HarnessError):
        return None
    layout = (getattr(entry, "splits", None) or {}).get(split)
    count = getattr(layout, "count", None)
    return int(count) if count else None


def official_count(dataset: str, split: str, official_counts: Optional[OfficialCounts] = None) -> Optional[int]:
    """Official image count of a split: from ``official_counts`` when given, else from the dataset registry."""
    if official_counts is not None:
        return official_counts.get((dataset, split))
    return _registry_count(dataset, split)


def record_limit(rec: RunRecord) -> Optional[int]:
    """The ``--limit`` a record was run with (``None`` for a full run)."""
    limit = (rec.settings or {}).get("limit")
    return None if limit is None else int(limit)


def is_partial(rec: RunRecord, official_counts: Optional[OfficialCounts] = None) -> bool:
    """True for ``--limit`` runs, runs that skipped bad images (``--on-bad-image skip``) and runs over fewer
    images than the official split: not comparable."""
    if record_limit(rec) is not None or getattr(rec, "partial", False):
        return True
    n = official_count(rec.dataset, rec.split, official_counts)
    return n is not None and rec.num_images < n


def cell_key(rec: RunRecord) -> Tuple[Any, ...]:
    """What makes two records compete for the same leaderboard cell."""
    return (rec.task, rec.protocol, rec.protocol_version, rec.backbone, rec.weights, rec.method,
            params_json(rec.method_params), params_json(rec.method_weights), rec.dataset, rec.split)


def select_records(records: Iterable[RunRecord],
                   official_counts: Optional[OfficialCounts] = None) -> List[RunRecord]:
    """One record per :func:`cell_key`: full runs beat partial ones, then the newest ``created`` wins."""
    best: Dict[Tuple[Any, ...], Tuple[Tuple[bool, _dt.datetime], RunRecord]] = {}
    for rec in records:
        rank = (not is_partial(rec, official_counts), _created(rec))
        key = cell_key(rec)
        if key not in best or rank > best[key][0]:
            best[key] = (rank, rec)
    return [rec for _, rec in best.values()]
