"""``harness report``: run records -> a tidy ``leaderboard.csv`` and a readable ``LEADERBOARD.md``.

Which records are shown is :mod:`harness.results.selection`; the tables' columns, headers and decimals
are :mod:`harness.results.layouts`. This module renders them, for these reasons:

* Random-init records (smoke tests, demos) go to separate tables titled as meaningless, so they can never
  be read as results. Partial runs (``--limit``, or fewer images than the official split) are marked †.
* Published numbers (``results/published``) are shown beside ours for the same (method, backbone, protocol
  id), one "published" row and one Δ = ours − published row per source table, plus the published-only
  tables of each protocol so a reader sees what the papers reported.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from ..errors import HarnessError
from .layouts import CSV_COLUMNS, DATASET_HEADERS, DECIMALS, METRIC_HEADERS, Column, Layout, table_layouts
from .published import AVG_DATASET, empty_published, find_published_dir, load_published
from .record import RunRecord, load_records
from .selection import OfficialCounts, is_partial, official_count, params_json, record_limit, select_records

DASH = "–"
PARTIAL_MARK = "†"
RANDOM_TITLE = "random-init weights: numbers are not meaningful"


# -- method-name matching --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def canonical_method(name: str) -> str:
    """The name our records give a (possibly ``+``-composed) method, so that published rows written with an
    alias or another part order match them: ``clip+dvt`` -> ``dvt`` (vanilla is the identity), ``tta+naclip``
    -> ``naclip+tta``. Names with parts the method registry does not know (``dvt-distilled``) keep those
    parts as they are."""
    from ..registry import METHODS, RegistryError

    try:
        from ..models import canonical_method as composed

        return composed(name)
    except (RegistryError, ImportError, HarnessError):
        pass
    parts = []
    for part in name.split("+"):
        try:
            parts.append(METHODS.canonical(part))
        except (RegistryError, ImportError, HarnessError):
            parts.append(part)
    return "+".join(parts)


# -- formatting ------------------------------------------------------------------------------------
def _fmt(value: Optional[float], metric: str, signed: bool = False) -> str:
    if value is None:
        return DASH
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    d = DECIMALS.get(metric, 4)
    return f"{value:+.{d}f}" if signed else f"{value:.{d}f}"


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(_esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_esc(c) for c in r) + " |" for r in rows]
    return out


def _method_label(method: str, params_json: str, weights_json: str = "{}") -> str:
    """``method (param=value, ...) [part weights sha256[:8]]``: every cell says which method weights made it."""
    params = json.loads(params_json)
    label = method
    if params:
        label += " (" + ", ".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"
    weights = json.loads(weights_json)
    if weights:
        label += " [" + ", ".join(f"{k} {v[:8]}" for k, v in sorted(weights.items())) + "]"
    return label


def _weights_label(weights: str) -> str:
    return weights if weights == "random-init" else weights[:8]


def _backbone_note(backbone: str) -> str:
    """The caveat a backbone id carries (``BackboneSpec.note``, e.g. unofficial weights); "" for unknown ids."""
    from ..registry import BACKBONES, RegistryError

    try:
        return str(getattr(BACKBONES.get(backbone), "note", "") or "")
    except (RegistryError, ImportError):
        return ""


def _column_header(col: Column, single_metric: bool) -> str:
    ds, metric = col
    name = DATASET_HEADERS.get(ds, ds)
    if single_metric:
        return name
    return f"{name} {METRIC_HEADERS.get(metric, metric)}"


# -- our rows --------------------------------------------------------------------------------------
@dataclass
class _Row:
    """One table row of ours: a (method+params, backbone, weights, split) with its cells."""

    method: str
    params_json: str
    method_weights: str  # JSON {part: sha256}
    backbone: str
    weights: str
    split: str
    cells: Dict[Column, Tuple[float, RunRecord, bool]]  # (value, record, partial)


def _rows_for(records: Sequence[RunRecord], official_counts: Optional[OfficialCounts]) -> List[_Row]:
    rows: Dict[Tuple[str, str, str, str, str, str], _Row] = {}
    for rec in records:
        key = (rec.method, params_json(rec.method_params), params_json(rec.method_weights), rec.backbone, rec.weights,
               rec.split)
        row = rows.setdefault(key, _Row(*key, cells={}))
        partial = is_partial(rec, official_counts)
        for metric, value in (rec.metrics or {}).items():
            if value is not None:
                row.cells[(rec.dataset, metric)] = (float(value), rec, partial)
    return sorted(rows.values(), key=lambda r: (r.backbone, r.method, r.params_json, r.method_weights, r.weights,
                                                r.split))


def _avg(values: Mapping[Column, Optional[float]], avg_cols: Sequence[Column]) -> Optional[float]:
    """Mean over ``avg_cols``, only when every one of them has a value (PH-Reg's 8-dataset Avg)."""
    if not avg_cols:
        return None
    got = [values.get(c) for c in avg_cols]
    if any(v is None for v in got):
        return None
    return sum(got) / len(got)  # type: ignore[arg-type]


# -- published -------------------------------------------------------------------------------------
def _published_groups(pub: pd.DataFrame) -> Dict[Tuple[str, str, str, str], Dict[Tuple[str, str], Dict[Column, float]]]:
    """(task, protocol, canonical method, backbone) -> {(paper, table): {(dataset, metric): value}}."""
    out: Dict[Tuple[str, str, str, str], Dict[Tuple[str, str], Dict[Column, float]]] = defaultdict(dict)
    for r in pub.itertuples(index=False):
        if r.dataset == AVG_DATASET:
            continue
        key = (r.task, r.protocol, canonical_method(r.method), r.backbone)
        out[key].setdefault((r.paper, r.table), {})[(r.dataset, r.metric)] = float(r.value)
    return out


def comparable_protocols(task: str, protocol: str) -> List[str]:
    """Our protocol id plus the published protocol ids its YAML declares comparable (``compare_with``).

    E.g. ``linear-seg/faithful`` is DVT's lin. recipe, so DVT's and PH-Reg Table 2's numbers (filed under
    ``dvt`` / ``phreg``) are shown beside it. Unknown protocols (a YAML path) match by id only.
    """
    from ..errors import ConfigError
    from ..protocols import get_protocol
    from ..registry import RegistryError

    try:
        extra = get_protocol(task, protocol).extra.get("compare_with") or []
    except (ConfigError, RegistryError):
        extra = []
    return [protocol, *[str(p) for p in extra if p != protocol]]


def _source_label(paper: str, table: str) -> str:
    names = {"phreg": "PH-Reg", "dvt": "DVT", "sclip": "SCLIP", "clearclip": "ClearCLIP", "naclip": "NACLIP"}
    return f"{names.get(paper, paper)} {table}"


# -- markdown sections -----------------------------------------------------------------------------
def _our_table(layout: Layout, rows: List[_Row], task: str, protocol: str,
               pub_groups: Mapping[Tuple[str, str, str, str], Mapping[Tuple[str, str], Mapping[Column, float]]],
               with_published: bool) -> List[str]:
    show_split = len({r.split for r in rows}) > 1
    header = ["Method", "Backbone", "Weights"] + (["Split"] if show_split else [])
    header += [_column_header(c, layout.single_metric is not None) for c in layout.columns]
    if layout.avg_cols:
        header.append("Avg")
    metric_of = {c: c[1] for c in layout.columns}
    avg_metric = layout.avg_cols[0][1] if layout.avg_cols else ""
    body: List[List[str]] = []
    footnotes: List[str] = []
    for row in rows:
        cells = {c: row.cells[c] for c in layout.columns if c in row.cells}
        if not cells:
            continue
        ours = {c: v for c, (v, _, _) in cells.items()}
        line = [_method_label(row.method, row.params_json, row.method_weights), row.backbone,
                _weights_label(row.weights)]
        if show_split:
            line.append(row.split)
        for c in layout.columns:
            if c in cells:
                v, rec, partial = cells[c]
                line.append(_fmt(v, metric_of[c]) + (PARTIAL_MARK if partial else ""))
                if partial:
                    limit = record_limit(rec)
                    footnotes.append(
                        f"{PARTIAL_MARK} {row.method} / {row.backbone} / {c[0]}: {rec.num_images} images"
                        + (f" (--limit {limit})" if limit is not None else "")
                        + (f" ({len(rec.skipped_images)} bad image(s) skipped)" if rec.skipped_images else "")
                        + ", not the full split")
            else:
                line.append(DASH)
        if layout.avg_cols:
            a = _avg(ours, layout.avg_cols)
            any_partial = any(cells[c][2] for c in layout.avg_cols if c in cells)
            line.append(_fmt(a, avg_metric) + (PARTIAL_MARK if a is not None and any_partial else ""))
        body.append(line)
        if _backbone_note(row.backbone):
            footnotes.append(f"`{row.backbone}`: {_backbone_note(row.backbone)}")
        if not with_published:
            continue
        matches: Dict[Tuple[str, str], Mapping[Column, float]] = {}
        for proto in comparable_protocols(task, protocol):
            matches.update(pub_groups.get((task, proto, canonical_method(row.method), row.backbone), {}))
        for (paper, table), values in sorted(matches.items()):
            if not any(c in values for c in layout.columns):
                continue
            label = _source_label(paper, table)
            pad = [""] * (2 + (1 if show_split else 0))
            pline = [f"↳ published: {label}"] + pad
            dline = [f"↳ Δ ours − {label}"] + pad
            for c in layout.columns:
                p = values.get(c)
                pline.append(_fmt(p, metric_of[c]))
                o = ours.get(c)
                dline.append(_fmt(o - p, metric_of[c], signed=True) if (o is not None and p is not None) else DASH)
            if layout.avg_cols:
                pa = _avg(values, layout.avg_cols)
                oa = _avg(ours, layout.avg_cols)
                pline.append(_fmt(pa, avg_metric))
                dline.append(_fmt(oa - pa, avg_metric, signed=True) if (oa is not None and pa is not None) else DASH)
            body += [pline, dline]
    if not body:
        return []
    out = _md_table(header, body)
    if footnotes:
        out.append("")
        out += [f"- {f}" for f in sorted(set(footnotes))]
    return out


def _published_tables(task: str, pub: pd.DataFrame) -> List[str]:
    """Published-only tables of one protocol: one per (paper, table) and layout."""
    out: List[str] = []
    for (paper, table), grp in pub.groupby(["paper", "table"], sort=False):  # file order, as published
        present = [(d, m) for d, m in zip(grp["dataset"], grp["metric"])]
        citations = sorted(set(grp["citation"]))
        for layout in table_layouts(task, present):
            values: Dict[Tuple[str, str], Dict[Column, float]] = defaultdict(dict)
            printed_avg: Dict[Tuple[str, str], str] = {}
            order: List[Tuple[str, str]] = []
            for r in grp.itertuples(index=False):
                rk = (r.method, r.backbone)
                if rk not in order:
                    order.append(rk)
                if r.dataset == AVG_DATASET:
                    if layout.single_metric == r.metric:
                        printed_avg[rk] = r.value_printed
                elif (r.dataset, r.metric) in layout.columns:
                    values[rk][(r.dataset, r.metric)] = float(r.value)
            rows_here = [rk for rk in order if values.get(rk)]
            if not rows_here:
                continue
            header = ["Method", "Backbone"] + [_column_header(c, layout.single_metric is not None)
                                               for c in layout.columns]
            has_printed = bool(printed_avg)
            if layout.avg_cols:
                header.append("Avg")
                if has_printed:
                    header.append("Avg (printed)")
            body = []
            for rk in rows_here:
                v = values[rk]
                line = [rk[0], rk[1]] + [_fmt(v.get(c), c[1]) for c in layout.columns]
                if layout.avg_cols:
                    line.append(_fmt(_avg(v, layout.avg_cols), layout.avg_cols[0][1]))
                    if has_printed:
                        line.append(printed_avg.get(rk, DASH))
                body.append(line)
            out += ["", f"##### {_source_label(paper, table)} ({layout.title})", ""]
            out += _md_table(header, body)
            out += ["", "Source: " + " | ".join(citations)]
    return out


def _task_order(tasks: Iterable[str]) -> List[str]:
    known = ["ovss", "linear-seg", "depth", "artifacts"]
    return sorted(set(tasks), key=lambda t: (known.index(t) if t in known else len(known), t))


def render_markdown(records: Sequence[RunRecord], published: pd.DataFrame, results_dir: str = "results",
                    official_counts: Optional[OfficialCounts] = None) -> str:
    """The LEADERBOARD.md text for already-selected ``records`` (see :func:`select_records`)."""
    lines = [
        "# Leaderboard",
        "",
        f"Generated by `harness report` from {len(records)} run record(s) under `{results_dir}/runs` and the "
        "published numbers in `results/published`; do not edit by hand.",
        "",
        "- Grouped by task, then protocol id; our tables are per protocol version. Segmentation metrics are "
        "percentages, Pearson is in [-1, 1], RMSE in metres.",
        "- OVSS Avg is the mean of the 8 datasets (7 for Pearson, as in PH-Reg Table S.4), shown only when all "
        f"are present, else {DASH}.",
        "- `artifacts`: outlier shares in % of patch tokens, norm CV, cosine to the view-averaged target at "
        "percentiles of dissimilarity (README, `harness run artifacts`).",
        "- `↳ published` rows: the same method and backbone in a paper or README, under the same protocol id or one "
        "the protocol's YAML lists in `compare_with`; `↳ Δ` = ours − published (see results/README.md).",
        f"- {PARTIAL_MARK} = partial run (`--limit`, bad images skipped, or fewer images than the official split): "
        "not comparable.",
        "- Weights: first 8 hex digits of the weights file's sha256.",
    ]
    by_task: Dict[str, List[RunRecord]] = defaultdict(list)
    for rec in records:
        by_task[rec.task].append(rec)
    pub_groups = _published_groups(published) if records else {}
    for task in _task_order(list(by_task) + list(published["task"])):
        lines += ["", f"## Task `{task}`"]
        recs = by_task.get(task, [])
        pub_task = published[published["task"] == task]
        ours_first = {r.protocol for r in recs}
        protocols = sorted(ours_first | set(pub_task["protocol"]), key=lambda p: (p not in ours_first, p))
        for protocol in protocols:
            lines += ["", f"### Protocol `{protocol}`"]
            precs = [r for r in recs if r.protocol == protocol]
            if not precs:
                lines += ["", "No runs under this protocol yet."]
            for version in sorted({r.protocol_version for r in precs}):
                vrecs = [r for r in precs if r.protocol_version == version]
                real = [r for r in vrecs if not r.random_init]
                rand = [r for r in vrecs if r.random_init]
                present = [(r.dataset, m) for r in vrecs for m in (r.metrics or {})]
                for layout in table_layouts(task, present):
                    for group, title, with_pub in ((real, "real weights", True), (rand, RANDOM_TITLE, False)):
                        if not group:
                            continue
                        table = _our_table(layout, _rows_for(group, official_counts), task, protocol,
                                           pub_groups, with_pub)
                        if table:
                            lines += ["", f"#### `{protocol}` v{version}, {layout.title}: {title}", ""] + table
            pp = pub_task[pub_task["protocol"] == protocol]
            if len(pp):
                lines += ["", f"#### Published numbers, protocol `{protocol}` (matched by protocol id, any version)"]
                lines += _published_tables(task, pp)
    return "\n".join(lines) + "\n"


# -- CSV ---------------------------------------------------------------------------------------------
def leaderboard_rows(records: Sequence[RunRecord], published: Optional[pd.DataFrame] = None,
                     official_counts: Optional[OfficialCounts] = None) -> List[Dict[str, Any]]:
    """Tidy rows: one per selected record × metric (``source=ours``), then the published numbers."""
    rows: List[Dict[str, Any]] = []
    for rec in records:
        limit = record_limit(rec)
        n_official = official_count(rec.dataset, rec.split, official_counts)
        for metric, value in sorted((rec.metrics or {}).items()):
            rows.append(dict(
                source="ours", task=rec.task, protocol=rec.protocol, protocol_version=rec.protocol_version,
                backbone=rec.backbone, weights=rec.weights, random_init=rec.random_init, method=rec.method,
                method_params=params_json(rec.method_params), method_weights=params_json(rec.method_weights),
                dataset=rec.dataset, split=rec.split, metric=metric,
                value=value, num_images=rec.num_images, official_num_images=n_official if n_official else "",
                limit="" if limit is None else limit, partial=is_partial(rec, official_counts),
                created=rec.created, git_hash=rec.git_hash, harness_version=rec.harness_version,
                paper="", table="", citation=""))
    rows.sort(key=lambda r: (r["task"], r["protocol"], r["protocol_version"], r["backbone"], r["method"],
                             r["method_params"], r["method_weights"], r["weights"], r["dataset"], r["split"],
                             r["metric"]))
    if published is not None:
        for r in published.itertuples(index=False):
            if r.dataset == AVG_DATASET:
                continue
            row = {c: "" for c in CSV_COLUMNS}
            row.update(source="published", task=r.task, protocol=r.protocol, backbone=r.backbone, method=r.method,
                       dataset=r.dataset, metric=r.metric, value=r.value_printed, paper=r.paper, table=r.table,
                       citation=r.citation)
            rows.append(row)
    return rows


def write_report(results_dir: str = "results", out_csv: Optional[str] = None, out_md: Optional[str] = None,
                 published_dir: Optional[str] = None,
                 official_counts: Optional[OfficialCounts] = None) -> Tuple[str, str]:
    """Read every RunRecord under ``results_dir/runs`` and write the leaderboard CSV and Markdown.

    Args:
        results_dir: holds ``runs/<task>/<protocol>/*.json``.
        out_csv: default ``<results_dir>/leaderboard.csv``.
        out_md: default ``<results_dir>/LEADERBOARD.md``.
        published_dir: published-number CSVs; default :func:`find_published_dir` (none found: ours only).
        official_counts: ``{(dataset, split): images}``; default the dataset registry's split counts.

    Returns:
        The paths written, ``(csv, md)``.
    """
    out_csv = out_csv or os.path.join(results_dir, "leaderboard.csv")
    out_md = out_md or os.path.join(results_dir, "LEADERBOARD.md")
    records = select_records(load_records(results_dir), official_counts)
    pdir = published_dir or find_published_dir(results_dir)
    published = load_published(published_dir=pdir) if pdir else empty_published()
    for path in (out_csv, out_md):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        w.writeheader()
        w.writerows(leaderboard_rows(records, published, official_counts))
    with open(out_md, "w") as f:
        f.write(render_markdown(records, published, results_dir, official_counts))
    return out_csv, out_md
