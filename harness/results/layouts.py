"""The leaderboard's table layouts, as data: column orders, headers, decimals and which tables a task gets.

Why a module of its own: the layouts copy the papers' tables and change when a paper is added, while the
rendering (:mod:`harness.results.report`) and the record selection (:mod:`harness.results.selection`)
do not. Layouts follow PH-Reg (Chen et al., NeurIPS 2025, arXiv:2505.21501): OVSS like Table 1 (8 datasets +
Avg, Pearson like Table S.4 with its 7 datasets), linear probes like Table 2 (VOC/ADE mIoU+mAcc; NYUd
RMSE/AbsRel/δ1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from .published import AVG_DATASET

#: PH-Reg Table 1 column order (VOC21 PC60 Object VOC20 PC59 Stuff City ADE)
OVSS_DATASETS: Tuple[str, ...] = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff164k",
                                  "cityscapes", "ade20k")
#: PH-Reg Table S.4 (Pearson) columns: Table 1 without COCO-Object
PEARSON_DATASETS: Tuple[str, ...] = ("voc21", "context60", "voc20", "context59", "coco_stuff164k", "cityscapes",
                                     "ade20k")
DATASET_HEADERS: Dict[str, str] = {"voc21": "VOC21", "context60": "PC60", "coco_object": "Object", "voc20": "VOC20",
                                   "context59": "PC59", "coco_stuff164k": "Stuff", "cityscapes": "City",
                                   "ade20k": "ADE", "nyu": "NYUd"}
METRIC_HEADERS: Dict[str, str] = {"rmse": "RMSE ↓", "abs_rel": "AbsRel ↓", "delta1": "δ1 ↑",
                                   "outliers_high": "high-norm % ↓", "outliers_low": "low-norm % ↓",
                                   "norm_cv": "norm CV ↓", "cos_p50": "cos p50 ↑", "cos_p70": "cos p70 ↑",
                                   "cos_p90": "cos p90 ↑", "cos_p95": "cos p95 ↑", "cos_p99": "cos p99 ↑"}
#: PH-Reg Table 2, segmentation half and depth half
LINEAR_SEG_COLUMNS: Tuple[Tuple[str, str], ...] = (("voc21", "mIoU"), ("voc21", "mAcc"), ("ade20k", "mIoU"),
                                                   ("ade20k", "mAcc"))
DEPTH_COLUMNS: Tuple[Tuple[str, str], ...] = (("nyu", "rmse"), ("nyu", "abs_rel"), ("nyu", "delta1"))
OVSS_METRIC_ORDER: Tuple[str, ...] = ("mIoU", "mAcc", "aAcc", "pearson")
#: the label-free columns of ``harness run artifacts``, in reading order (PH-Reg §4.3: norms, then Fig. 5)
ARTIFACT_METRICS: Tuple[str, ...] = ("outliers_high", "outliers_low", "norm_cv", "cos_p50", "cos_p70", "cos_p90",
                                     "cos_p95", "cos_p99")
#: decimals shown per metric (as the papers print them)
DECIMALS: Dict[str, int] = {"mIoU": 2, "mAcc": 2, "aAcc": 2, "pearson": 3, "rmse": 4, "abs_rel": 4, "delta1": 2,
                            "outliers_high": 2, "outliers_low": 2, "norm_cv": 3, "cos_p50": 3, "cos_p70": 3,
                            "cos_p90": 3, "cos_p95": 3, "cos_p99": 3}
#: column order of the tidy leaderboard.csv (one row per record x metric, then the published numbers)
CSV_COLUMNS: Tuple[str, ...] = (
    "source", "task", "protocol", "protocol_version", "backbone", "weights", "random_init", "method",
    "method_params", "method_weights", "dataset", "split", "metric", "value", "num_images", "official_num_images",
    "limit", "partial", "created", "git_hash", "harness_version", "paper", "table", "citation",
)

Column = Tuple[str, str]  # (dataset, metric)


@dataclass
class Layout:
    """Columns of one table and the columns its Avg is taken over (empty: no Avg column)."""

    title: str
    columns: List[Column]
    avg_cols: List[Column]
    single_metric: Optional[str]  # the metric when every column has it (headers then show datasets only)


def table_layouts(task: str, present: Iterable[Column]) -> List[Layout]:
    """The tables of a task, given the (dataset, metric) pairs present; unknown pairs are appended."""
    present = sorted(set(c for c in present if c[0] != AVG_DATASET))
    if task == "ovss":
        metrics = sorted({m for _, m in present},
                         key=lambda m: (OVSS_METRIC_ORDER.index(m) if m in OVSS_METRIC_ORDER else 99, m))
        out = []
        for metric in metrics:
            base = [(d, metric) for d in (PEARSON_DATASETS if metric == "pearson" else OVSS_DATASETS)]
            extra = [c for c in present if c[1] == metric and c not in base]
            out.append(Layout(metric, base + extra, base, metric))
        return out
    if task == "artifacts":
        return _artifact_layouts(present)
    base = list(LINEAR_SEG_COLUMNS if task == "linear-seg" else DEPTH_COLUMNS if task == "depth" else ())
    extra = [c for c in present if c not in base]
    cols = base + extra
    if not cols:
        return []
    metrics = {m for _, m in cols}
    title = "PH-Reg Table 2 layout" if task in ("linear-seg", "depth") else "all metrics"
    return [Layout(title, cols, [], next(iter(metrics)) if len(metrics) == 1 else None)]



def _artifact_layouts(present: List[Column]) -> List[Layout]:
    """``artifacts``: Pearson like PH-Reg Table S.4 (7 datasets + Avg), then one label-free table per dataset."""
    out = []
    if any(m == "pearson" for _, m in present):
        base = [(d, "pearson") for d in PEARSON_DATASETS]
        out.append(Layout("pearson", base + [c for c in present if c[1] == "pearson" and c not in base], base,
                          "pearson"))
    for ds in sorted({d for d, m in present if m != "pearson"}):
        cols = [(ds, m) for m in ARTIFACT_METRICS if (ds, m) in present]
        cols += [c for c in present if c[0] == ds and c[1] != "pearson" and c not in cols]
        out.append(Layout(f"label-free, {DATASET_HEADERS.get(ds, ds)}", cols, [], None))
    return out
