"""A whole ``harness viz`` run: read the images, run every method, project jointly, draw, write the page."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..methods.base import DenseModel
from ..metrics.artifacts import outlier_share, patch_norms
from ..protocols import get_protocol
from ..runtime import progress
from ..text.encoder import class_queries
from .features import DEFAULT_RESOLUTION, dense_patches, read_view
from .figure import ImageFigure, MethodColumn, render_figure
from .page import write_index
from .projection import joint_colours
from .text import DEFAULT_NAMES, default_query, encode_query, query_map, resolve_names, segment


@dataclass
class VizSettings:
    """The options of a viz run (``harness viz``); text settings apply to CLIP ids only."""

    projection: str = "pca"
    resolution: int = DEFAULT_RESOLUTION
    names: Optional[str] = None  # a name-set key or a file; None = DEFAULT_NAMES
    query: Optional[str] = None  # None = "a photo of a <first non-background name>."
    cache_dir: Optional[str] = None  # text-embedding cache (None = $HARNESS_CACHE or ~/.cache/harness)
    seed: int = 0
    title: str = "harness viz"
    show_progress: bool = True


@dataclass
class VizResult:
    index: str
    figures: List[str] = field(default_factory=list)
    query: Optional[str] = None
    names: Optional[str] = None


def figure_name(image_path: str, images_root: str, taken: set) -> str:
    """A PNG file name for ``image_path`` that is unique in the run (sub-folders joined with ``__``)."""
    rel = os.path.relpath(os.path.abspath(image_path), os.path.abspath(images_root))
    stem = os.path.splitext(rel)[0].replace(os.sep, "__").replace("/", "__")
    name, k = f"{stem}.png", 1
    while name in taken or name == "index.html":
        name, k = f"{stem}-{k}.png", k + 1
    taken.add(name)
    return name


def write_viz(models: Sequence[DenseModel], image_paths: Sequence[str], images_root: str, out_dir: str,
              device: torch.device, settings: Optional[VizSettings] = None) -> VizResult:
    """Draw one figure per image (a column per model) into ``out_dir`` and write ``out_dir/index.html``.

    ``models`` are the methods of one backbone (built as for ``harness run``: one backbone, each method
    attached to it). The text side (name set, templates, logit scale) is the default OVSS protocol's.
    """
    s = settings or VizSettings()
    if not models:
        raise ConfigError("harness viz needs at least one --method")
    if not image_paths:
        raise ConfigError(f"--images {images_root}: no images to draw")
    spec = models[0].spec
    if not spec.has_text and (s.query or s.names):
        raise ConfigError(f"--query/--names: backbone {spec.id!r} has no text tower; only CLIP ids draw text rows")
    os.makedirs(out_dir, exist_ok=True)
    views = [read_view(p, s.resolution, spec.patch_size, spec.mean, spec.std)
             for p in progress(image_paths, desc="viz: read", enabled=s.show_progress)]
    feats = [dense_patches(models, v, device) for v in progress(views, desc="viz: features",
                                                                  enabled=s.show_progress)]
    colours = joint_colours([f for per_image in feats for f in per_image], s.projection, s.seed)
    query = names_label = None
    class_names = None
    if spec.has_text:
        proto = get_protocol("ovss").defaults
        names_label, names = resolve_names(s.names or DEFAULT_NAMES, proto["name_set"])
        query = s.query if s.query is not None else default_query(names)
        text = class_queries(models[0], names, proto["templates"], device, s.cache_dir)
        q = encode_query(models[0], query, device)
        # a class with aliases (VOC21's background lists 26 stuff names) shows its first name and the count
        class_names = [n[0] if len(n) == 1 else f"{n[0]} (+{len(n) - 1})" for n in names]
    notes = ["random-init weights: the pictures say nothing about the methods"] \
        if models[0].backbone.weights_id == "random-init" else []
    taken: set = set()
    result = VizResult(index="", query=query, names=names_label)
    m = len(models)
    for i, (view, per_image) in enumerate(zip(views, feats)):
        size = tuple(view.rgb.shape[:2])
        cols = []
        for j, (model, patch) in enumerate(zip(models, per_image)):
            norms = patch_norms(patch.unsqueeze(0))
            col = MethodColumn(method=model.name, colours=colours[i * m + j],
                               norms=norms[0].reshape(patch.shape[-2:]).numpy(), outliers=outlier_share(norms))
            if class_names is not None:
                qm = query_map(patch, q)
                col.query = F.interpolate(qm[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
                col.segmentation = segment(patch, text.embeddings, text.query_class, text.num_classes,
                                           size, float(proto["logit_scale"])).numpy().astype(np.int64)
            cols.append(col)
        png = os.path.join(out_dir, figure_name(view.path, images_root, taken))
        render_figure(ImageFigure(title=os.path.relpath(view.path, images_root), rgb=view.rgb, columns=cols,
                                  projection=s.projection, query=query, class_names=class_names, notes=notes), png)
        result.figures.append(png)
    rows: List[Tuple[str, str]] = [
        ("backbone", f"{spec.id} ({models[0].backbone.weights_id[:12]})"),
        ("methods", ", ".join(mm.name for mm in models)),
        ("images", f"{len(image_paths)} from {images_root}, short side {s.resolution} px"),
        ("features", f"{s.projection.upper()} to RGB, fitted jointly over all methods and images"),
        ("norm", "per-token L2 norm; outliers: per-image modified z-score |M| > 3.5"),
    ]
    if class_names is not None:
        rows += [("query", str(query)), ("segmentation", f"argmax over the {names_label} names "
                                                         f"({len(class_names)} classes)")]
    result.index = write_index(out_dir, [(os.path.relpath(v.path, images_root), p) for v, p in
                                         zip(views, result.figures)], rows, title=s.title,
                               note=notes[0] if notes else "")
    return result
