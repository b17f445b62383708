"""``harness sensitivity``: how far one number moves when the protocol around it moves.

A published OVSS mIoU depends on settings papers rarely state together (short side, window, temperature,
threshold, PAMR, name file). This command runs one method on one dataset under every registered protocol
of the task, then changes one knob of the chosen protocol at a time. Each variant is a real protocol: a copy
of the chosen protocol's file with one value changed, a derived id (``phreg~resize=336``), the same version,
checked by the protocol schema and written as YAML under the output folder. It runs through the normal
evaluator, so every row of the table IS a run record in the results folder (a second invocation reads them
back instead of recomputing) and ``harness run ovss --protocol VARIANT.yaml`` reproduces any row.

Settings known to be wrong are flagged, not hidden: a probability or area threshold on a dataset without a
background class sends pixels to class 0, which there is a real class (github.com/wangf3014/SCLIP issue #2:
a 0.07 mIoU COCO-Stuff reproduction, answered by the author with "for datasets without a background class,
you should not set prob_thd").
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from .errors import ConfigError

#: knobs a variant may change (keys of the ``ovss`` protocol schema, harness/protocols/schema_ovss.py)
KNOBS = ("resize", "crop", "stride", "logit_scale", "prob_thd", "pamr", "name_set")
#: tasks whose knob grid is defined (the knobs above are OVSS settings)
SENSITIVITY_TASKS = ("ovss",)

#: short side x{0.75, 1.25}: around 448 this gives 336 and 560, the other short sides of PH-Reg Table S.5
#: (Chen et al., NeurIPS 2025, arXiv:2505.21501, Appendix C.1), also used by SCLIP's configs
#: (github.com/wangf3014/SCLIP @ b56bd30 configs/cfg_*.py: 336, COCO-Stuff 448, Cityscapes 560)
RESIZE_FACTORS = (0.75, 1.25)
#: window sizes used by the field: 224 SCLIP/NACLIP (clip_segmentor.py slide_crop=224 @ b56bd30; naclip.py
#: @ 0cac3a6), 336 PH-Reg Table S.5, 448 ClearCLIP (mc-lan/ClearCLIP @ ad68a40 clearclip_segmentor.py)
CROPS = (224, 336, 448)
#: strides used by the field: 112 SCLIP/NACLIP/PH-Reg (same files), 224 ClearCLIP (slide_stride=224)
STRIDES = (112, 224)
#: softmax temperatures used by the field: 40 NACLIP (naclip.py logit_scale=40 @ 0cac3a6) and PH-Reg
#: (protocol phreg), 50 ClearCLIP (clearclip_segmentor.py logit_scale=50 @ ad68a40), 100 CLIP's own learned
#: scale, clamped at 100 (Radford et al., "Learning Transferable Visual Models From Natural Language
#: Supervision", ICML 2021, arXiv:2103.00020, Sec. 2.5)
LOGIT_SCALES = (40.0, 50.0, 100.0)
#: probability thresholds: 0 (none; SCLIP/NACLIP on datasets without background), 0.1 (SCLIP @ b56bd30 and
#: NACLIP @ 0cac3a6 configs on VOC21/PC60/Object), 0.2 (ClearCLIP's value for vanilla CLIP on datasets with
#: background: github.com/mc-lan/ClearCLIP issue #2, answer of the author, 2024-09-11)
PROB_THDS = (0.0, 0.1, 0.2)
#: PAMR as NACLIP turns it on: naclip.py @ 0cac3a6 pamr_steps=10, pamr_stride=(8, 16) (arXiv:2404.08181)
NACLIP_PAMR: Dict[str, Any] = {"steps": 10, "dilations": [8, 16]}


@dataclass
class Variant:
    """One row to run: a registered protocol (``knob`` None) or the chosen one with ``knob`` set to ``value``."""

    protocol: str  # id of the protocol, or the path of the variant's YAML file
    protocol_id: str
    knob: Optional[str] = None
    value: Any = None
    base_value: Any = None
    settings: Dict[str, Any] = field(default_factory=dict)


def has_background(spec: Any) -> bool:
    """Whether label 0 of the dataset is a background class that thresholds may assign pixels to."""
    names = spec.class_names
    return bool(names) and not spec.reduce_zero_label and names[0].strip().lower() == "background"


def wrong_settings(settings: Dict[str, Any], spec: Any) -> List[str]:
    """Settings known to give wrong numbers on this dataset, one sentence each (empty: none known)."""
    if has_background(spec):
        return []
    first = spec.class_names[0] if spec.class_names else "?"
    out = []
    if float(settings.get("prob_thd") or 0.0) > 0:
        out.append(f"prob_thd {settings['prob_thd']:g} on {spec.name}, which has no background class: pixels "
                   f"below it become class 0 ({first!r}), a real class (SCLIP issue #2: no prob_thd without "
                   f"background)")
    if settings.get("area_thd") is not None:
        out.append(f"area_thd {settings['area_thd']:g} on {spec.name}, which has no background class: it treats "
                   f"class 0 ({first!r}) as background")
    return out


def knob_values(knob: str, settings: Dict[str, Any], name_key: str) -> List[Any]:
    """The alternative values of ``knob`` around ``settings`` (the current value left out)."""
    cur = settings[knob]
    if knob == "resize":
        vals: List[Any] = [int(round(cur * f)) for f in RESIZE_FACTORS]
    elif knob == "crop":
        vals = [c for c in CROPS if c >= settings["stride"]]  # stride <= crop, or windows leave gaps
    elif knob == "stride":
        vals = [s for s in STRIDES if s <= settings["crop"]]
    elif knob == "logit_scale":
        vals = list(LOGIT_SCALES)
    elif knob == "prob_thd":
        vals = list(PROB_THDS)
    elif knob == "pamr":
        vals = [None, dict(NACLIP_PAMR)]
    elif knob == "name_set":
        from .text.names import available_name_sets

        vals = [s for s, keys in available_name_sets().items() if name_key in keys]
    else:
        raise ConfigError(f"--knobs {knob!r}: expected some of {', '.join(KNOBS)}")
    out: List[Any] = []
    for v in vals:
        if v != cur and v not in out:
            out.append(v)
    return out


def format_value(value: Any) -> str:
    """A knob value as it appears in a variant id and the table (``off``, ``10x8-16``, ``0.1``)."""
    if value is None:
        return "off"
    if isinstance(value, dict):
        return f"{value['steps']}x" + "-".join(str(d) for d in value["dilations"])
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def protocol_data(protocol: Any) -> Dict[str, Any]:
    """A loaded protocol back as the mapping its YAML file holds."""
    data = {"id": protocol.id, "version": protocol.version, "task": protocol.task,
            "description": protocol.description, "source": protocol.source,
            "defaults": dict(protocol.defaults), "datasets": {k: dict(v) for k, v in protocol.datasets.items()}}
    data.update(protocol.extra)
    return data


def write_variant(protocol: Any, dataset: str, knob: str, value: Any, folder: str) -> str:
    """The chosen protocol with ``knob = value`` on ``dataset``, as a schema-checked YAML file; its path.

    The variant keeps only ``dataset`` (the one measured), so its id never names settings it was not run with.
    """
    import yaml

    from .io_safety import atomic_write_text
    from .protocols import load_protocol_file

    data = protocol_data(protocol)
    vid = f"{protocol.id}~{knob}={format_value(value)}"
    data["id"] = vid
    was = format_value(protocol.settings(dataset)[knob])
    data["description"] = (f"{protocol.description} Sensitivity variant (harness sensitivity): {knob} = "
                           f"{format_value(value)} on {dataset} instead of {was}.")
    data["datasets"] = {dataset: {**protocol.datasets.get(dataset, {}), knob: value}}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{vid}.yaml")
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True), "variant protocol")
    load_protocol_file(path)  # the schema checks it like any shipped protocol; a bad variant fails here
    return path


def plan(task: str, protocol: Optional[str], dataset: str, knobs: Sequence[str], out: str,
         all_protocols: bool = True) -> List[Variant]:
    """Every row to run: the registered protocols with an entry for ``dataset``, then the knob variants."""
    from .protocols import get_protocol, list_protocols
    from .registry import DATASETS

    if task not in SENSITIVITY_TASKS:
        raise ConfigError(f"--task {task!r}: sensitivity has a knob grid for {', '.join(SENSITIVITY_TASKS)} only")
    bad = [k for k in knobs if k not in KNOBS]
    if bad:
        raise ConfigError(f"--knobs {','.join(bad)}: expected some of {', '.join(KNOBS)}")
    name = DATASETS.canonical(dataset)
    spec = DATASETS.get(name)
    chosen = get_protocol(task, protocol)
    if chosen.task != task:
        raise ConfigError(f"protocol file {chosen.path} is for task {chosen.task!r}, not {task!r}")
    if name not in chosen.datasets:
        raise ConfigError(f"--protocol {chosen.id!r} ({chosen.path}) has no entry for dataset {name!r}; it has "
                          f"{', '.join(chosen.datasets)}")
    rows = [Variant(protocol or chosen.id, chosen.id, settings=chosen.settings(name))]
    if all_protocols:
        rows += [Variant(p.id, p.id, settings=p.settings(name)) for p in list_protocols(task)
                 if p.id != chosen.id and name in p.datasets]
    base = chosen.settings(name)
    folder = os.path.join(out, "protocols")
    for knob in knobs:
        for value in knob_values(knob, base, spec.key):
            path = write_variant(chosen, name, knob, value, folder)
            vid = os.path.splitext(os.path.basename(path))[0]
            rows.append(Variant(path, vid, knob, value, base[knob], {**base, knob: value}))
    return rows


@dataclass
class Row:
    """One line of the table: a variant and the record it ran to."""

    variant: Variant
    record: Any
    flags: List[str]

    def as_dict(self, reference: float) -> Dict[str, Any]:
        v, m = self.variant, self.record.metrics
        return {"protocol": v.protocol_id, "knob": v.knob or "(protocol)",
                "value": format_value(v.value) if v.knob else "",
                "base_value": format_value(v.base_value) if v.knob else "",
                "mIoU": round(m["mIoU"], 4), "mAcc": round(m["mAcc"], 4), "aAcc": round(m["aAcc"], 4),
                "delta_mIoU": round(m["mIoU"] - reference, 4), "flag": "; ".join(self.flags)}


#: vertical offsets (points) of the dot labels in the plot, cycled within a knob's row
LABEL_OFFSETS = (9, -9, 18, -18)
COLUMNS = ("protocol", "knob", "value", "base_value", "mIoU", "mAcc", "aAcc", "delta_mIoU", "flag")


def write_table(rows: Sequence[Row], out: str) -> Dict[str, str]:
    """``sensitivity.csv`` and ``sensitivity.md`` (delta vs the first row, the chosen protocol); their paths."""
    from .io_safety import atomic_write_text

    ref = rows[0].record.metrics["mIoU"]
    dicts = [r.as_dict(ref) for r in rows]
    csv_path = os.path.join(out, "sensitivity.csv")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows(dicts)
    atomic_write_text(csv_path, buf.getvalue(), "sensitivity table")
    rec = rows[0].record
    miou = [d["mIoU"] for d in dicts]
    lines = [f"# Sensitivity: {rec.method} on {rec.dataset} ({rec.backbone}, {rec.weights[:12]})", "",
             f"Reference: protocol `{rows[0].variant.protocol_id}` v{rec.protocol_version}, mIoU {ref:.2f}. "
             f"Spread over {len(rows)} settings: {min(miou):.2f} to {max(miou):.2f} "
             f"({max(miou) - min(miou):.2f} mIoU).", ""]
    if any(n.startswith("random-init") for n in rec.notes):
        lines += ["RANDOM WEIGHTS: these numbers say nothing about the method.", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for d in dicts:
        cells = [str(d[c]) if c != "flag" else ("⚠ " + d[c] if d[c] else "") for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    md_path = os.path.join(out, "sensitivity.md")
    atomic_write_text(md_path, "\n".join(lines) + "\n", "sensitivity table")
    return {"csv": csv_path, "md": md_path}


def write_plot(rows: Sequence[Row], out: str) -> str:
    """A PNG of the spread: one dot per setting, grouped by knob, flagged settings in red; its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: List[str] = []
    for r in rows:
        g = r.variant.knob or "protocols"
        if g not in groups:
            groups.append(g)
    ref = rows[0].record.metrics["mIoU"]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(groups) + 1.5))
    for y, g in enumerate(groups):
        members = [r for r in rows if (r.variant.knob or "protocols") == g]
        for i, r in enumerate(members):
            x = r.record.metrics["mIoU"]
            ax.scatter([x], [y], color="tab:red" if r.flags else "tab:blue", zorder=3)
            label = format_value(r.variant.value) if r.variant.knob else r.variant.protocol_id
            # labels alternate above and below, so equal numbers stay readable
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(0, LABEL_OFFSETS[i % len(LABEL_OFFSETS)]),
                        ha="center", va="center", fontsize=7)
    ax.axvline(ref, color="grey", linestyle="--", label=f"{rows[0].variant.protocol_id} ({ref:.2f})")
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels(groups)
    ax.set_ylim(-0.7, len(groups) - 0.3)
    ax.set_xlabel("mIoU")
    rec = rows[0].record
    ax.set_title(f"{rec.method} on {rec.dataset}: mIoU per setting (red: flagged)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, "sensitivity.png")
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run_sensitivity(cfg: Any, out: str, knobs: Sequence[str] = KNOBS, all_protocols: bool = True
                    ) -> Dict[str, Any]:
    """Run every row of :func:`plan` for ``cfg`` (a RunConfig: backbone, method, dataset, protocol, results).

    Returns the rows and the paths of the table and the plot.
    """
    from .evaluators.base import RunConfig
    from .registry import DATASETS, EVALUATORS

    variants = plan(cfg.task, cfg.protocol, cfg.dataset, knobs, out, all_protocols)
    spec = DATASETS.get(DATASETS.canonical(cfg.dataset))
    evaluator = EVALUATORS.get(cfg.task)()
    rows: List[Row] = []
    for v in variants:
        one = RunConfig(**{**cfg.__dict__, "protocol": v.protocol})
        rec = evaluator.run_methods(one, [cfg.method])[0]
        rows.append(Row(v, rec, wrong_settings(rec.settings, spec)))
    paths = write_table(rows, out)
    paths["png"] = write_plot(rows, out)
    return {"rows": rows, **paths}
