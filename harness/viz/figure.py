"""One PNG per image: a column per method, rows for the image, the feature colours, the token norms and,
for CLIP ids, a text query's heatmap and the predicted segmentation with a legend (PH-Reg Fig. 1 / Fig. 4
layout, Chen et al., NeurIPS 2025, arXiv:2505.21501, plus the norm and segmentation rows).

Drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), with every axis placed
in pixels, so the PNG's size is known in advance: :func:`figure_size`.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

#: our layout choices, in pixels at DPI dots per inch
DPI = 100
PANEL = 240  # one square panel
ROW_TITLE = 22  # the line of text above each panel
LABEL_W = 120  # the row labels on the left
TOP = 34  # the figure title (the image's name)
MARGIN = 10  # right and bottom margin
LEGEND_ROW = 20  # one line of the segmentation legend
LEGEND_ENTRY_W = 120  # width of one legend entry
LEGEND_MAX = 40  # most classes listed (a name set such as COCO-Stuff has 171); the rest are counted
#: opacity of a heatmap / segmentation drawn over the image (our choice: the objects stay visible)
OVERLAY_ALPHA = 0.6


def voc_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours of the PASCAL VOC label colour map (VOC2012 devkit, ``VOClabelcolormap.m``):
    the bits of the class index spread over the high bits of R, G and B, so neighbouring labels differ."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


@dataclass
class MethodColumn:
    """What one method contributes to one image's figure."""

    method: str
    colours: np.ndarray  # (h, w, 3) in [0, 1]: the joint projection of the features
    norms: np.ndarray  # (h, w) per-token L2 norms
    outliers: Dict[str, float]  # share of high / low norm outlier tokens (modified z-score)
    query: Optional[np.ndarray] = None  # (H, W) cosine with the text query, at image size
    segmentation: Optional[np.ndarray] = None  # (H, W) class indices


@dataclass
class ImageFigure:
    """One image and its columns; ``class_names`` and ``query`` only for CLIP ids."""

    title: str
    rgb: np.ndarray  # (H, W, 3) uint8
    columns: List[MethodColumn]
    projection: str = "pca"
    query: Optional[str] = None
    class_names: Optional[List[str]] = None
    notes: List[str] = field(default_factory=list)

    @property
    def has_text(self) -> bool:
        return self.class_names is not None


def legend_columns(num_methods: int) -> int:
    return max(1, (num_methods * PANEL) // LEGEND_ENTRY_W)


def legend_lines(num_methods: int, num_classes: int) -> int:
    """Lines reserved for the legend: room for every class of the name set, up to :data:`LEGEND_MAX` (+1 line
    for the "and N more" note)."""
    if num_classes <= 0:
        return 0
    shown = min(num_classes, LEGEND_MAX)
    return math.ceil(shown / legend_columns(num_methods)) + (1 if num_classes > LEGEND_MAX else 0)


def row_names(has_text: bool) -> Tuple[str, ...]:
    return ("image", "features", "norm", "query", "segmentation") if has_text else ("image", "features", "norm")


def figure_size(num_methods: int, has_text: bool, num_classes: int = 0) -> Tuple[int, int]:
    """(width, height) in pixels of the PNG for ``num_methods`` columns (and a name set of ``num_classes``)."""
    rows = len(row_names(has_text))
    width = LABEL_W + num_methods * PANEL + MARGIN
    height = TOP + rows * (PANEL + ROW_TITLE) + MARGIN
    if has_text:
        height += legend_lines(num_methods, num_classes) * LEGEND_ROW
    return width, height


def _row_label(fig: ImageFigure, row: str) -> str:
    if row == "features":
        return f"{fig.projection.upper()} of the\ndense features\n(joint fit)"
    if row == "norm":
        return "token norm"
    if row == "query":
        return "query:\n" + "\n".join(textwrap.wrap(repr(fig.query or ""), 16)[:5])
    return row


def _panel_title(fig: ImageFigure, col: MethodColumn, row: str) -> str:
    if row == "image":
        return col.method
    if row == "norm":
        return (f"{col.norms.min():.3g}-{col.norms.max():.3g}; outliers "
                f"{100 * col.outliers.get('high', 0):.1f}% hi {100 * col.outliers.get('low', 0):.1f}% lo")
    if row == "query" and col.query is not None:
        return f"cosine {col.query.min():.2f} .. {col.query.max():.2f}"
    return ""


def _legend_items(fig: ImageFigure, palette: np.ndarray) -> Tuple[List[Tuple[str, np.ndarray]], int]:
    """Classes predicted in any column, largest total area first (at most LEGEND_MAX), and how many were left."""
    assert fig.class_names is not None
    counts = np.zeros(len(fig.class_names), dtype=np.int64)
    for col in fig.columns:
        if col.segmentation is not None:
            counts += np.bincount(col.segmentation.reshape(-1), minlength=len(counts))[:len(counts)]
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    shown = sorted(present[:LEGEND_MAX])
    return [(fig.class_names[i], palette[i]) for i in shown], max(0, len(present) - LEGEND_MAX)


def render_figure(fig: ImageFigure, path: str) -> Tuple[int, int]:
    """Draw ``fig`` and write it as a PNG at ``path``; returns its (width, height) in pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = len(fig.columns)
    num_classes = len(fig.class_names) if fig.class_names is not None else 0
    width, height = figure_size(n, fig.has_text, num_classes)
    mpl_fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(mpl_fig)
    mpl_fig.text(MARGIN / width, 1 - 8 / height, fig.title, ha="left", va="top", fontsize=11, weight="bold")
    if fig.notes:
        mpl_fig.text(1 - MARGIN / width, 1 - 8 / height, "; ".join(fig.notes), ha="right", va="top", fontsize=8,
                     color="firebrick")
    h_img, w_img = fig.rgb.shape[:2]
    extent = (0, w_img, h_img, 0)
    palette = voc_palette(max(num_classes, 1))
    for r, row in enumerate(row_names(fig.has_text)):
        y_top = TOP + r * (PANEL + ROW_TITLE) + ROW_TITLE
        bottom = 1 - (y_top + PANEL) / height
        mpl_fig.text(MARGIN / width, 1 - (y_top + PANEL / 2) / height, _row_label(fig, row), ha="left",
                     va="center", fontsize=9)
        for c, col in enumerate(fig.columns):
            ax = mpl_fig.add_axes(((LABEL_W + c * PANEL) / width, bottom, (PANEL - 4) / width, (PANEL - 4) / height))
            ax.set_axis_off()
            title = _panel_title(fig, col, row)
            if title:
                ax.set_title(title, fontsize=10 if row == "image" else 7, pad=3,
                             weight="bold" if row == "image" else "normal")
            if row == "image":
                ax.imshow(fig.rgb, extent=extent)
            elif row == "features":
                ax.imshow(col.colours, interpolation="nearest", extent=extent)
            elif row == "norm":
                ax.imshow(col.norms, cmap="inferno", interpolation="nearest", extent=extent)
            elif row == "query" and col.query is not None:
                ax.imshow(fig.rgb.mean(axis=2), cmap="gray", extent=extent)
                ax.imshow(col.query, cmap="jet", alpha=OVERLAY_ALPHA, extent=extent)
            elif row == "segmentation" and col.segmentation is not None:
                blend = (OVERLAY_ALPHA * palette[col.segmentation] + (1 - OVERLAY_ALPHA) * fig.rgb) / 255.0
                ax.imshow(np.clip(blend, 0, 1), interpolation="nearest", extent=extent)
    if fig.has_text:
        items, more = _legend_items(fig, palette)
        handles = [Patch(facecolor=colour / 255.0, edgecolor="black", linewidth=0.5, label=name)
                   for name, colour in items]
        if more:
            handles.append(Patch(facecolor="white", edgecolor="white", label=f"... and {more} more"))
        if handles:
            legend_h = legend_lines(n, num_classes) * LEGEND_ROW
            mpl_fig.legend(handles=handles, loc="upper left", ncol=legend_columns(n), fontsize=8, frameon=False,
                           bbox_to_anchor=(LABEL_W / width, (legend_h + MARGIN) / height),
                           handlelength=1.2, columnspacing=1.0, borderaxespad=0.0, labelspacing=0.3)
    mpl_fig.savefig(path, dpi=DPI)
    return width, height
