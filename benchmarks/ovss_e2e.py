"""End-to-end OVSS wall time: ``harness run ovss`` against a faithful re-implementation of the authors' loop.

Both run as fresh processes (cold: imports, model build, no text cache) on the same generated images with
the same random-init CLIP ViT-B/16 and method, under the same protocol settings:

  * authors: the SCLIP / NACLIP evaluation loop (wangf3014/SCLIP@b56bd30 ``clip_segmentor.py``,
    sinahmr/NACLIP@0cac3a6 ``naclip.py``): the mmseg dataset, text encoded per class name at
    initialisation (80 templates, ``clip.tokenize`` to 77 tokens, the full 77-token tower, mean of the
    normalised embeddings), recomputed every run; then one image and one window at a time
    (``forward_slide``: pad-and-add), PAMR if the protocol has it, ``postprocess_result``, IoU;
  * harness: ``python -m harness.cli run ovss ... --profile`` with an empty cache folder.

The script prints both wall times, their ratio, the harness's ``--profile`` table and both mIoUs (they
must agree: same model, same numbers). ``uptime``'s load is printed too: other jobs slow both sides.

    python benchmarks/ovss_e2e.py --dataset voc21 --images 8
    python benchmarks/ovss_e2e.py --dataset ade20k --images 4
    python benchmarks/ovss_e2e.py --dataset voc21 --images 8 --device cuda --harness-only   # GPU: harness side

``--harness-only`` times the harness side alone (the reference loop is CPU code, one window at a time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONE = "clip-b16-openai"
#: VOC images are about 500 x 375 (PASCAL VOC2012); ADE20K validation images are about 512 px on the short side
#: (ADEChallengeData2016). The generator varies each size by up to about 25%.
SIZES = {"voc21": (375, 500), "ade20k": (512, 683)}


def authors_loop(dataset: str, root: str, method: str, protocol: str) -> Dict[str, Any]:
    """The reference evaluation, timed inside this (fresh) process from its first harness import."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from harness.compat.mmcv_ops import import_mmseg
    from harness.methods.pamr import pamr
    from harness.models import build_dense_model
    from harness.ovss.inference import postprocess
    from harness.protocols import get_protocol
    from harness.registry import DATASETS
    from harness.text.encoder import queries_from_names
    from harness.text.names import load_name_set
    from harness.text.templates import render
    from harness.windows import slide_windows

    settings = get_protocol("ovss", protocol).settings(dataset)
    spec = DATASETS.get(dataset)
    model = build_dense_model(BACKBONE, method, random_init=True)
    bb = model.backbone
    import_mmseg()
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS as MMSEG_DATASETS

    from harness.datasets import _mmseg_extra  # noqa: F401

    init_default_scope("mmseg")
    pipeline = [dict(type="LoadImageFromFile"),
                dict(type="Resize", scale=(int(settings["max_long_side"]), int(settings["resize"])), keep_ratio=True),
                dict(type="LoadAnnotations")]
    ds = MMSEG_DATASETS.build(spec.mmseg_config(root, "val", pipeline))
    names, owner = queries_from_names(load_name_set(settings["name_set"], spec.key))
    with torch.no_grad():  # SCLIP __init__: one class name at a time, 80 prompts at 77 tokens
        qs = []
        for n in names:
            f = bb.model.encode_text(bb.tokenize(render(settings["templates"], n)))
            f = f / f.norm(dim=-1, keepdim=True)
            f = f.mean(0)
            qs.append(f / f.norm())
        text = torch.stack(qs)
    query_class = torch.tensor(owner)
    mean = torch.tensor(bb.spec.mean_255).view(1, 3, 1, 1)
    std = torch.tensor(bb.spec.std_255).view(1, 3, 1, 1)
    crop, stride = int(settings["crop"]), int(settings["stride"])
    n_cls = spec.num_classes
    inter, union = np.zeros(n_cls), np.zeros(n_cls)
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            img = torch.from_numpy(np.ascontiguousarray(item["img"][..., ::-1])).permute(2, 0, 1)[None].float()
            img = (img - mean) / std
            h, w = img.shape[-2:]
            ori = tuple(int(v) for v in item["ori_shape"][:2])
            if settings["mode"] == "whole":
                f = model.forward_dense(img).patch
                f = f / f.norm(dim=1, keepdim=True)
                logits = F.interpolate(torch.einsum("nchw,qc->nqhw", f, text), size=ori, mode="bilinear")
            else:  # forward_slide: one window per forward, padded and added
                preds = torch.zeros(1, text.shape[0], h, w)
                count = torch.zeros(1, 1, h, w)
                for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
                    c = img[:, :, y1:y2, x1:x2]
                    f = model.forward_dense(c).patch
                    f = f / f.norm(dim=1, keepdim=True)
                    lg = F.interpolate(torch.einsum("nchw,qc->nqhw", f, text), size=c.shape[-2:], mode="bilinear")
                    preds += F.pad(lg, (x1, w - x2, y1, h - y2))
                    count[:, :, y1:y2, x1:x2] += 1
                logits = F.interpolate(preds / count, size=ori, mode="bilinear")
            if settings.get("pamr"):
                small = F.interpolate(img, size=ori, mode="bilinear")
                logits = pamr(small, logits, int(settings["pamr"]["steps"]), tuple(settings["pamr"]["dilations"]))
            pred = postprocess(logits[0], query_class, n_cls, float(settings["logit_scale"]),
                               float(settings["prob_thd"] or 0.0), settings.get("area_thd")).numpy()
            gt = np.asarray(item["gt_seg_map"]).astype(np.int64)
            valid = gt != 255
            p, g = pred[valid], gt[valid]
            ai = np.bincount(p[p == g], minlength=n_cls)[:n_cls]
            ap = np.bincount(p, minlength=n_cls)[:n_cls]
            ag = np.bincount(g, minlength=n_cls)[:n_cls]
            inter += ai
            union += ap + ag - ai
    with np.errstate(invalid="ignore", divide="ignore"):
        miou = float(np.nanmean(np.where(union > 0, inter / union, np.nan)) * 100)
    return {"mIoU": miou, "images": len(ds), "prompts": len(names) * len(render(settings["templates"], "x"))}


def _timed(cmd: List[str], env: Dict[str, str]) -> Tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def _device_name(device: str) -> str:
    """``cpu``, or the GPU's name as CUDA reports it (``torch.cuda.get_device_name``)."""
    if not device.startswith("cuda"):
        return device
    import torch

    return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"


def _load() -> str:
    return " ".join(os.getloadavg().__repr__().strip("()").split(", ")[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="voc21", choices=sorted(SIZES))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--method", default="naclip")
    ap.add_argument("--protocol", default="phreg")
    ap.add_argument("--out", default=None, help="append the markdown result to this file")
    ap.add_argument("--device", default="cpu", help="the harness side's --device (cpu, cuda)")
    ap.add_argument("--harness-only", action="store_true", help="time the harness side only")
    ap.add_argument("--authors-loop", nargs=2, metavar=("DATASET", "ROOT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.authors_loop:  # the child process of the reference side
        print("RESULT " + json.dumps(authors_loop(a.authors_loop[0], a.authors_loop[1], a.method, a.protocol)))
        return
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, ROOT)
        from harness.synthetic.segmentation import write_synthetic_dataset

        root = write_synthetic_dataset(a.dataset, os.path.join(tmp, "data"), num_images=a.images,
                                       size=SIZES[a.dataset])
        load_before = _load()
        ours_s, out = _timed([sys.executable, "-m", "harness.cli", "run", "ovss", "--backbone", BACKBONE,
                              "--random-init", "--method", a.method, "--dataset", a.dataset, "--data-root", root,
                              "--protocol", a.protocol, "--results-dir", os.path.join(tmp, "results"),
                              "--cache-dir", os.path.join(tmp, "cache"), "--device", a.device, "--no-progress",
                              "--profile"], env)
        if not a.harness_only:
            ref_s, ref_out = _timed([sys.executable, os.path.abspath(__file__), "--method", a.method, "--protocol",
                                     a.protocol, "--authors-loop", a.dataset, root], env)
        load_after = _load()
    m = re.search(r"mIoU ([\d.]+)", out)
    profile = out[out.index("profile ("):].rstrip()
    flags = " --device " + a.device + (" --harness-only" if a.harness_only else "")
    lines = [
        f"### OVSS end to end: {a.method} on {a.dataset} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"`python benchmarks/ovss_e2e.py --dataset {a.dataset} --images {a.images} --method {a.method} "
        f"--protocol {a.protocol}{flags}`. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"harness device {_device_name(a.device)}; load average (1/5/15 min) before {load_before}, after {load_after}"
        + (" (other jobs were running)." if os.getloadavg()[0] > 2.5 or float(load_before.split()[0]) > 1.0 else
           " (quiet machine: the rise is the benchmark's own processes)."),
        f"{a.images} generated {a.dataset} images of about {SIZES[a.dataset][0]}x{SIZES[a.dataset][1]}, random-init "
        f"CLIP ViT-B/16; both sides are fresh processes with no text cache.",
        "",
        "| side | wall time (s) | mIoU |",
        "|---|---|---|",
    ]
    if not a.harness_only:
        ref = json.loads(ref_out.split("RESULT ", 1)[1])
        lines.append(f"| authors' loop (per-class 77-token text, {ref['prompts']} prompts, one window at a time) | "
                     f"{ref_s:.1f} | {ref['mIoU']:.4f} |")
    lines.append(f"| harness run ovss | {ours_s:.1f} | {(float(m.group(1)) if m else float('nan')):.4f} |")
    if not a.harness_only:
        lines.append(f"| **ratio authors / harness** | **{ref_s / ours_s:.2f}x** | |")
    lines += [
        "",
        "```",
        profile,
        "```",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
