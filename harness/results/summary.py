"""A short human summary of a run record: the line the CLI and the demo print after each run."""
from __future__ import annotations

from typing import Any, Optional


def format_record(rec: Any) -> str:
    """A short human summary of a RunRecord, with the per-class table for segmentation."""
    lines = [f"== {rec.task} | {rec.protocol} v{rec.protocol_version} | {rec.backbone} ({rec.weights[:12]}) | "
             f"{rec.method} | {rec.dataset} ({rec.num_images} images, {rec.wall_time_s:.1f} s)"]
    if rec.weights == "random-init":
        lines.append("   NOTE: random-init weights -- these numbers say nothing about the method.")
    if rec.per_class:
        width = max(len(c) for c in rec.per_class)
        lines.append(f"   {'class':<{width}}  {'IoU':>6}  {'Acc':>6}")
        for c, v in rec.per_class.items():
            lines.append(f"   {c:<{width}}  {_fmt(v.get('IoU')):>6}  {_fmt(v.get('Acc')):>6}")
    lines.append("   " + "  ".join(f"{k} {_fmt(v)}" for k, v in rec.metrics.items()))
    return "\n".join(lines)


def _fmt(v: Optional[float]) -> str:
    if v is None or v != v:
        return "nan"
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}"
