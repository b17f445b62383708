"""``harness demo``: the whole OVSS pipeline on generated data, in a few minutes on a laptop CPU.

It writes a small dataset in the PASCAL VOC 2012 layout, runs the five training-free methods with a
*randomly initialised* CLIP ViT-B/16 under the default ``phreg`` protocol (the real mmseg dataset class,
sliding window, text cache, IoU metric, result records), writes the leaderboard and the ``harness viz``
page of its images, and prints a short summary: one line per method, then where both are. The weights
are random, so the numbers only show that everything runs end to end; they say nothing about the methods.
"""
from __future__ import annotations

import os
import time
from typing import Any, List, Sequence

DEMO_METHODS = ("clip", "maskclip", "sclip", "clearclip", "naclip")
BANNER = "RANDOM WEIGHTS: the demo checks the pipeline end to end; its numbers say nothing about the methods."


#: square images: at the protocol's 448 short side each needs 2 x 2 windows of 336 (CPU budget: < 5 min)
DEMO_IMAGE_SIZE = (320, 320)
#: the viz page's text query names VOC label 8, "cat" (one of the demo's classes, DEMO_VOC_CLASSES)
DEMO_QUERY_CLASS = 8


def summary_lines(records: Sequence[Any], leaderboard: str, viz_index: str) -> List[str]:
    """The demo's terminal summary: one line per method with its headline numbers, then the two paths."""
    width = max((len(r.method) for r in records), default=0)
    lines = [f"{r.method:<{width}}  " + "  ".join(f"{k} {v:.2f}" for k, v in r.metrics.items()) for r in records]
    lines.append(f"leaderboard: {leaderboard}")
    lines.append(f"viz page:    {viz_index}")
    return lines


def _evaluate(cfg: Any) -> List[Any]:
    """The five methods in one OVSS pass (they share the trunk); their records."""
    from .registry import EVALUATORS

    return list(EVALUATORS.get("ovss")().run_methods(cfg, DEMO_METHODS))


def _visualise(cfg: Any, out: str) -> str:
    """``harness viz`` of the demo images for the five methods (text cache shared with the run); the index path."""
    from .evaluators.base import build_models
    from .image_folder import list_images
    from .protocols import get_protocol
    from .runtime import select_device
    from .text.names import load_name_set
    from .viz.render import VizSettings, write_viz

    device = select_device(cfg.device)
    images = os.path.join(cfg.data_root, "JPEGImages")
    names = load_name_set(get_protocol("ovss").defaults["name_set"], "voc21")
    settings = VizSettings(resolution=DEMO_IMAGE_SIZE[0], names="voc21", query=f"a photo of a "
                           f"{names[DEMO_QUERY_CLASS][0]}.", cache_dir=cfg.cache_dir, title="harness demo: viz")
    models = build_models(cfg, DEMO_METHODS, device)
    return write_viz(models, list_images(images), images, out, device, settings).index


def run_demo(out: str, num_images: int = 4, device: str = "auto") -> int:
    from .evaluators.base import RunConfig
    from .results.report import write_report
    from .synthetic.segmentation import write_demo_voc

    t0 = time.time()
    print(BANNER)
    data_root = write_demo_voc(os.path.join(out, "data"), num_images=num_images, size=DEMO_IMAGE_SIZE)
    print(f"demo data ({num_images} images, VOC2012 layout): {data_root}")
    results_dir = os.path.join(out, "results")
    cfg = RunConfig(task="ovss", backbone="clip-b16-openai", method=DEMO_METHODS[0], dataset="voc21",
                    data_root=data_root, random_init=True, device=device, num_workers=1, results_dir=results_dir,
                    cache_dir=os.path.join(out, "cache"))
    records = _evaluate(cfg)
    _, md = write_report(results_dir)
    index = _visualise(cfg, os.path.join(out, "viz"))
    print("\n".join(summary_lines(records, md, index)))
    print(f"{BANNER}\ndemo finished in {time.time() - t0:.0f} s")
    return 0
