"""``harness demo``: the whole OVSS pipeline on generated data, in a few minutes on a laptop CPU.

It writes a small dataset in the PASCAL VOC 2012 layout, runs the five training-free methods with a
*randomly initialised* CLIP ViT-B/16 under the default ``phreg`` protocol (the real mmseg dataset class,
sliding window, text cache, IoU metric, result records), and writes the leaderboard. The weights are
random, so the numbers only show that everything runs end to end; they say nothing about the methods.
"""
from __future__ import annotations

import os
import time

DEMO_METHODS = ("clip", "maskclip", "sclip", "clearclip", "naclip")
BANNER = "RANDOM WEIGHTS: the demo checks the pipeline end to end; its numbers say nothing about the methods."


#: square images: at the protocol's 448 short side each needs 2 x 2 windows of 336 (CPU budget: < 5 min)
DEMO_IMAGE_SIZE = (320, 320)


def run_demo(out: str, num_images: int = 4, device: str = "auto") -> int:
    from .evaluators.base import RunConfig
    from .registry import EVALUATORS
    from .results.report import write_report
    from .results.summary import format_record
    from .synthetic.segmentation import write_demo_voc

    t0 = time.time()
    print(BANNER)
    data_root = write_demo_voc(os.path.join(out, "data"), num_images=num_images, size=DEMO_IMAGE_SIZE)
    print(f"demo data ({num_images} images, VOC2012 layout): {data_root}")
    results_dir = os.path.join(out, "results")
    evaluator = EVALUATORS.get("ovss")()
    cfg = RunConfig(task="ovss", backbone="clip-b16-openai", method=DEMO_METHODS[0], dataset="voc21",
                    data_root=data_root, random_init=True, device=device, num_workers=1, results_dir=results_dir,
                    cache_dir=os.path.join(out, "cache"))
    for rec in evaluator.run_methods(cfg, DEMO_METHODS):  # one pass: the five methods share the trunk
        print(format_record(rec).splitlines()[0])
        print("   " + "  ".join(f"{k} {v:.2f}" for k, v in rec.metrics.items()))
    paths = write_report(results_dir)
    md = [p for p in (paths if isinstance(paths, (list, tuple)) else [paths]) if str(p).endswith(".md")]
    if md:
        with open(md[0]) as f:
            print(f.read())
    print(f"wrote {', '.join(str(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths]))}")
    print(f"{BANNER}\ndemo finished in {time.time() - t0:.0f} s")
    return 0
