"""Published numbers (papers, repository READMEs) as tidy data files, so reports can put them beside ours.

Numbers live in ``results/published/*.csv`` with their citation, never in code. Each row is one printed
value: ``task, paper, table, protocol, method, backbone, dataset, metric, value, citation, notes``.
``value`` is kept exactly as printed (``value_printed``) and parsed to float (``value``).
"""
from __future__ import annotations

import glob
import os
from typing import List, Optional

import pandas as pd

from ..errors import ConfigError

COLUMNS = ("task", "paper", "table", "protocol", "method", "backbone", "dataset", "metric", "value", "citation",
           "notes")
#: columns that must be non-empty in every row (``notes`` may be empty)
REQUIRED = tuple(c for c in COLUMNS if c != "notes")
TASKS = ("ovss", "linear-seg", "depth", "artifacts")
#: the pseudo-dataset holding a table's printed average (kept to show it, never used in arithmetic)
AVG_DATASET = "avg"
#: identity of one published number
KEY = ("task", "paper", "table", "protocol", "method", "backbone", "dataset", "metric")

#: results/published of the source checkout (the package sits next to ``results/``)
DEFAULT_PUBLISHED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                     "results", "published")


def _read_one(path: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ConfigError(f"cannot read published-numbers file {path}: {e}") from e
    if tuple(df.columns) != COLUMNS:
        raise ConfigError(f"{path}: columns must be exactly {', '.join(COLUMNS)} (found {', '.join(df.columns)})")
    for col in REQUIRED:
        empty = df.index[df[col].str.strip() == ""]
        if len(empty):
            raise ConfigError(f"{path}: empty {col!r} on data line(s) {', '.join(str(i + 2) for i in empty[:5])}")
    bad_task = sorted(set(df["task"]) - set(TASKS))
    if bad_task:
        raise ConfigError(f"{path}: unknown task(s) {', '.join(bad_task)}; known: {', '.join(TASKS)}")
    values = pd.to_numeric(df["value"], errors="coerce")
    bad = df.index[values.isna()]
    if len(bad):
        raise ConfigError(f"{path}: non-numeric value {df.loc[bad[0], 'value']!r} on line {bad[0] + 2}")
    df["value_printed"] = df["value"]
    df["value"] = values.astype(float)
    df["source_file"] = os.path.basename(path)
    return df


def find_published_dir(results_dir: Optional[str] = None) -> Optional[str]:
    """First folder holding published-number CSVs: ``<results_dir>/published``, ``./results/published``, or the
    source checkout's ``results/published``. None when the harness runs from an install outside the repository."""
    candidates = ([os.path.join(results_dir, "published")] if results_dir else []) + [
        os.path.join(os.getcwd(), "results", "published"), DEFAULT_PUBLISHED_DIR]
    for d in candidates:
        if glob.glob(os.path.join(d, "*.csv")):
            return d
    return None


def empty_published() -> pd.DataFrame:
    """A published-numbers frame with no rows (reports without the repository's results/published)."""
    return pd.DataFrame({c: pd.Series(dtype=float if c == "value" else str)
                         for c in (*COLUMNS, "value_printed", "source_file")})


def load_published(task: Optional[str] = None, published_dir: Optional[str] = None) -> pd.DataFrame:
    """All published numbers (optionally of one ``task``), validated; a :class:`ConfigError` names bad rows.

    Columns: :data:`COLUMNS` (``value`` as float) plus ``value_printed`` (the printed string) and
    ``source_file``. A number that appears twice under the same :data:`KEY` is an error, because a report
    could not tell which one to compare against.
    """
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    d = published_dir or DEFAULT_PUBLISHED_DIR
    paths = sorted(glob.glob(os.path.join(d, "*.csv")))
    if not paths:
        raise ConfigError(f"no published-numbers files (*.csv) in {d}")
    frames: List[pd.DataFrame] = [_read_one(p) for p in paths]
    df = pd.concat(frames, ignore_index=True)
    dup = df[df.duplicated(list(KEY), keep=False)]
    if len(dup):
        first = dup.iloc[0]
        raise ConfigError("published number listed twice: " + ", ".join(f"{k}={first[k]}" for k in KEY)
                          + f" (files: {', '.join(sorted(set(dup['source_file'])))})")
    if task is not None:
        df = df[df["task"] == task].reset_index(drop=True)
    return df
