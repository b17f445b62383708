"""Distillation throughput: images/s and peak memory of the DVT stages (and PH-Reg, once it exists).

Each row runs in its own child process (so its peak memory is its own) with small step counts on random
images: DVT stage 1 (per-image neural fields: view extraction + fitting), DVT stage 2 (the one-block
denoiser on stage 1's output) and, when ``harness.distill.phreg`` is importable, PH-Reg through its
``harness distill phreg`` entry point (the shared CLI flags: ``--steps``, ``--batch-size``, ``--resolution``,
``--random-init``); without it that row says "not available" and the rest runs. Backbones: the planted test
CLIP at 224 and ViT-B/16 (``clip-b16-openai`` architecture, random init: speed does not depend on the weights)
at 448. Memory: peak RSS of the child (``resource.getrusage``; it includes torch itself, so the growth over
the RSS before the stage is given too) and, on CUDA, ``torch.cuda.max_memory_allocated``.

    python benchmarks/distill_throughput.py --device cpu            # prints the table, writes distill_throughput.md

Stage-1 rows also split the time into view extraction (ms per view) and fitting (ms per step), which is what
the full recipe scales with: 769 views and 25,000 steps per image (Denoising-ViT @ 82704df,
main_img_denoising.py: --num_views 768 plus the full image, --num_iters 25000).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

#: (backbone id, resolution, images, stage-1 views, stage-1 steps, stage-2 / PH-Reg steps, batch)
CONFIGS = [
    ("test-planted-clip", 224, 4, 16, 50, 50, 4),
    ("clip-b16-openai", 448, 2, 4, 10, 10, 2),
]
#: DVT's recipe, for the extrapolation note (main_img_denoising.py @ 82704df: 768 views + the full image, 25k steps)
RECIPE_VIEWS, RECIPE_STEPS = 769, 25_000


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def write_images(folder: str, n: int, size: int) -> str:
    """``n`` planted-style test images (flat areas and textured rectangles) as PNG files."""
    import numpy as np
    import torch
    from PIL import Image

    from harness.backbones.planted import CLIP_MEAN, CLIP_STD, low_information_images

    os.makedirs(folder, exist_ok=True)
    x = low_information_images(n, size=(size, size), seed=11)
    x = x * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    for i, im in enumerate(x):
        arr = (im.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"{i:03d}.png"))
    return folder


def child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run one row in this process; return its measurements."""
    import matplotlib.pyplot  # noqa: F401 - imported before the baseline RSS: the loss-curve plot needs it
    import timm  # noqa: F401 - likewise (the denoiser block)
    import torch

    from harness.distill import dvt
    from harness.image_folder import list_images
    from harness.runtime import select_device

    device = select_device(spec["device"])
    cuda = device.type == "cuda"
    images = write_images(os.path.join(spec["work"], "images"), spec["images"], spec["res"])
    out = os.path.join(spec["work"], "dvt.pt")
    extra: Dict[str, Any] = {}
    if spec["row"] == "dvt1":
        from harness.models import build_dense_model

        model = build_dense_model(spec["backbone"], "vanilla", random_init=True).to(device)
        s1 = dvt.Stage1Settings(resolution=spec["res"], views=spec["views"], steps=spec["steps"], batch=1)
        spent = [0.0]
        orig = dvt.view_features

        def timed(*a: Any, **k: Any) -> Any:  # split extraction from fitting
            t = time.perf_counter()
            r = orig(*a, **k)
            if cuda:
                torch.cuda.synchronize()
            spent[0] += time.perf_counter() - t
            return r

        dvt.view_features = timed

        def work() -> Any:
            return dvt.stage1(model, list_images(images), dvt.stage1_dir(out), s1, device, show_progress=False,
                              checkpoint_every=10 ** 9)
        n_img = spec["images"]
    elif spec["row"] == "dvt2":
        s2 = dvt.Stage2Settings(steps=spec["steps"], batch=spec["batch"])

        def work() -> Any:
            return dvt.stage2(dvt.stage1_dir(out), out, s2, device, show_progress=False, checkpoint_every=10 ** 9)
        n_img = spec["steps"] * spec["batch"]
    else:  # phreg through its CLI entry point, whatever its internals
        from harness.cli import build_parser

        phreg = importlib.import_module("harness.distill.phreg")
        args = build_parser().parse_args(
            ["distill", "phreg", "--backbone", spec["backbone"], "--images", images, "--out",
             os.path.join(spec["work"], "phreg.pt"), "--steps", str(spec["steps"]), "--batch-size", str(spec["batch"]),
             "--resolution", str(spec["res"]), "--random-init", "--device", str(device), "--no-progress"])

        def work() -> Any:
            return phreg.run(args)
        n_img = spec["steps"] * spec["batch"]
    base = _rss_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    work()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    if spec["row"] == "dvt1":
        fit = seconds - spent[0]
        n_views = spec["images"] * (spec["views"] + 1)
        steps = spec["images"] * spec["steps"]
        grid = spec["res"] // model.spec.patch_size
        extra = {"ms_per_view": 1e3 * spent[0] / n_views, "ms_per_step": 1e3 * fit / steps,
                 "recipe_feature_mb": RECIPE_VIEWS * grid * grid * model.vision.width * 4 / 2 ** 20}
    return {"seconds": seconds, "images": n_img, "images_per_s": n_img / seconds, "peak_rss_mb": _rss_mb(),
            "base_rss_mb": base, "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None,
            **extra}


def run_row(spec: Dict[str, Any]) -> Dict[str, Any]:
    """``spec`` in a child process; its JSON result, or ``{"error": ...}``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], capture_output=True,
                       text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:160]}
    return json.loads(lines[-1])


def table(rows: List[Dict[str, Any]]) -> str:
    head = ("| row | backbone | input | setting | images | time (s) | images/s | peak RSS (MB) | RSS growth (MB) "
            "| peak CUDA (MB) |\n|---|---|---|---|---|---|---|---|---|---|\n")
    out = []
    for r in rows:
        m = r["result"]
        if "error" in m or "skipped" in m:
            what = "failed (see notes)" if "error" in m else "not available"
            out.append(f"| {r['label']} | `{r['backbone']}` | {r['res']} | {r['setting']} | - | - | {what} "
                       "| - | - | - |")
            continue
        cuda = "-" if m["peak_cuda_mb"] is None else f"{m['peak_cuda_mb']:.0f}"
        out.append(f"| {r['label']} | `{r['backbone']}` | {r['res']} | {r['setting']} | {m['images']} | "
                   f"{m['seconds']:.1f} | {m['images_per_s']:.3f} | {m['peak_rss_mb']:.0f} | "
                   f"{m['peak_rss_mb'] - m['base_rss_mb']:.0f} | {cuda} |")
    return head + "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", default=None, help="comma-separated backbone ids (default: all)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "distill_throughput.md"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return

    import torch

    from harness.runtime import device_description, select_device

    device = select_device(a.device)
    has_phreg = importlib.util.find_spec("harness.distill.phreg") is not None
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    for backbone, res, n, views, s1, s2, batch in CONFIGS:
        if a.only and backbone not in a.only.split(","):
            continue
        with tempfile.TemporaryDirectory() as work:
            base = {"backbone": backbone, "res": res, "images": n, "device": str(device), "work": work}
            plan = [("DVT stage 1", {**base, "row": "dvt1", "views": views, "steps": s1},
                     f"{views}+1 views, {s1} steps/image, 2048 samples"),
                    ("DVT stage 2", {**base, "row": "dvt2", "steps": s2, "batch": batch},
                     f"{s2} steps x batch {batch}")]
            plan.append(("PH-Reg", {**base, "row": "phreg", "steps": s2, "batch": batch},
                         f"{s2} steps x batch {batch}"))
            for label, spec, setting in plan:
                if spec["row"] == "phreg" and not has_phreg:
                    result: Dict[str, Any] = {"skipped": "harness.distill.phreg not present"}
                else:
                    print(f"running {label} on {backbone} ...", file=sys.stderr, flush=True)
                    result = run_row(spec)
                rows.append({"label": label, "backbone": backbone, "res": f"{res}x{res}", "setting": setting,
                             "result": result})
                if "ms_per_view" in result:
                    per_image = (RECIPE_VIEWS * result["ms_per_view"] + RECIPE_STEPS * result["ms_per_step"]) / 1e3
                    notes.append(f"`{backbone}` at {res}: view extraction {result['ms_per_view']:.0f} ms/view, "
                                 f"fitting {result['ms_per_step']:.0f} ms/step (batch 1) -> the full recipe "
                                 f"({RECIPE_VIEWS} views, {RECIPE_STEPS} steps) would take about "
                                 f"{per_image / 3600:.2f} h per image here (extrapolated, not measured); its view "
                                 f"features alone take {result['recipe_feature_mb']:.0f} MB per image (fp32, "
                                 f"computed).")
                if "error" in result:
                    notes.append(f"{label} on `{backbone}` failed: {result['error']}")
                if "skipped" in result:
                    notes.append(f"{label} on `{backbone}`: not available ({result['skipped']}); the row fills in "
                                 f"once the module exists.")
    date = datetime.date.today().isoformat()
    text = (f"### Distillation throughput ({date})\n\n"
            f"Machine: {platform.machine()}, {device_description(device)}, torch {torch.__version__}. Random images; "
            f"random-init weights (speed does not depend on them). Stage-1 throughput counts images fully "
            f"processed (views extracted + fitted); stage-2 and PH-Reg count images per optimisation step x steps.\n\n"
            + table(rows) + "\n" + "".join(f"- {n}\n" for n in notes))
    print(text)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    main()
