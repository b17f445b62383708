"""bf16 against fp32 in ``harness run ovss``: the mIoU drift, the labels that change and the time of each.

The protocol's ``precision`` key is the knob: ``fp32`` is the reference, ``bf16`` runs the backbone's dense forward
under ``torch.autocast(bfloat16)`` (the text tower, cosine logits, upsampling and post-processing stay fp32). This
script writes the chosen protocol's ``precision=bf16`` variant (``harness sensitivity``'s variant writer: same
settings, id ``<protocol>~precision=bf16``), then runs the same generated images, at the protocol's real size,
through ``harness run ovss`` under both, in this process, and compares

  * mIoU of each method under each precision and the drift (bf16 - fp32, in mIoU points),
  * the share of pixels (all of them, labelled or not) whose predicted label changes (``--save-predictions``),
  * the time of each: the inference stages of ``--profile`` (data loading, backbone, upsampling, PAMR,
    post-processing, metric; text and model build excluded: the text cache is filled before either is timed)
    and the backbone stage alone.

A random-init CLIP ViT-B/16 (``clip-b16-openai`` architecture) is used: its weights are no trained model's, so the
drift says how far bf16 rounding moves this pipeline's labels, not what it does to a published number. The default
datasets are VOC20 and ADE20K, which ``phreg`` runs without a probability threshold: on VOC21 (``prob_thd`` 0.1)
the random-init model's labels came out the same for every method (mIoU 19.78 each, benchmarks/RESULTS.md), so
the threshold, not the features, decided them. bf16 on a CPU is fast only with bf16 matrix instructions (AMX,
AVX512-BF16); the flags of the machine are printed.

    python benchmarks/precision_drift.py --datasets voc20,ade20k --images 2 --out benchmarks/RESULTS.md
    python benchmarks/precision_drift.py --device cuda --images 4 --out gpu/precision_drift.md   # unchanged on a GPU
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BACKBONE = "clip-b16-openai"
#: VOC images are about 500 x 375 (PASCAL VOC2012); ADE20K validation images about 512 px on the short side
#: (ADEChallengeData2016); the same sizes as benchmarks/ovss_e2e.py
SIZES = {"voc21": (375, 500), "voc20": (375, 500), "ade20k": (512, 683)}
#: the ``--profile`` stages that make up inference (everything per image)
INFERENCE_STAGES = ("data loading", "backbone", "upsampling", "pamr", "post-processing", "metric")
#: /proc/cpuinfo flags of bf16 matrix support (Intel AMX tiles, AVX512-BF16) and their prerequisite AVX512F
BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")


def machine(device: str) -> str:
    """The machine in one line: CPU model and bf16 flags, torch, the device's name, load average."""
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    have = [f for f in BF16_FLAGS if f in flags]
    parts = [f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, bf16 flags: "
             f"{', '.join(have) if have else 'none of ' + ', '.join(BF16_FLAGS)}",
             f"torch {torch.__version__}"]
    if device.startswith("cuda"):
        dev = torch.device(device)
        parts.append(f"GPU {torch.cuda.get_device_name(dev)} (bf16 supported: {torch.cuda.is_bf16_supported()})")
    else:
        parts.append("no GPU used")
    return "; ".join(parts)


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def bf16_protocol(protocol: str, dataset: str, folder: str) -> str:
    """The protocol with ``precision: bf16`` on ``dataset`` (a schema-checked variant file); its path."""
    from harness.protocols import get_protocol
    from harness.sensitivity import write_variant

    return write_variant(get_protocol("ovss", protocol), dataset, "precision", "bf16", folder)


def warm_text(dataset: str, protocol: str, device: str, cache: str) -> float:
    """Encode the dataset's class queries into ``cache`` (fp32, shared by both precisions); seconds."""
    import torch

    from harness.models import build_dense_model
    from harness.protocols import get_protocol
    from harness.registry import DATASETS
    from harness.runtime import select_device
    from harness.text.encoder import class_queries
    from harness.text.names import load_name_set

    settings = get_protocol("ovss", protocol).settings(dataset)
    dev = select_device(device)
    model = build_dense_model(BACKBONE, "vanilla", random_init=True).to(dev)
    t = time.perf_counter()
    with torch.inference_mode():
        class_queries(model, load_name_set(settings["name_set"], DATASETS.get(dataset).key), settings["templates"],
                      dev, cache)
    return time.perf_counter() - t


def run(dataset: str, root: str, protocol: str, methods: str, device: str, tmp: str, tag: str
        ) -> Tuple[Dict[str, Any], str]:
    """One ``harness run ovss`` pass (all methods sharing the trunk); records by method and the predictions folder."""
    from harness.cli import main
    from harness.results.record import load_records

    results, preds = os.path.join(tmp, f"results-{tag}"), os.path.join(tmp, f"preds-{tag}")
    args = ["run", "ovss", "--backbone", BACKBONE, "--random-init", "--method", methods, "--dataset", dataset,
            "--data-root", root, "--protocol", protocol, "--results-dir", results, "--cache-dir",
            os.path.join(tmp, "cache"), "--device", device, "--save-predictions", preds, "--no-progress",
            "--profile", "--workers", "0"]
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(args)
    if rc != 0:
        raise SystemExit(f"harness run ovss failed ({rc}): {' '.join(args)}")
    return {r.method: r for r in load_records(results)}, preds


def changed_share(a: str, b: str) -> float:
    """Share (%) of pixels whose label differs between two folders of prediction PNGs of the same images."""
    from PIL import Image

    names = sorted(os.listdir(a))
    if names != sorted(os.listdir(b)) or not names:
        raise SystemExit(f"prediction folders {a} and {b} hold different images")
    diff = total = 0
    for n in names:
        x, y = np.array(Image.open(os.path.join(a, n))), np.array(Image.open(os.path.join(b, n)))
        diff += int((x != y).sum())
        total += x.size
    return 100.0 * diff / total


def stage_seconds(rec: Any) -> Tuple[float, float]:
    """(inference seconds, backbone seconds) from the record's ``--profile`` breakdown."""
    st = rec.settings["profile"]["stages_s"]
    return sum(st.get(k, 0.0) for k in INFERENCE_STAGES), st.get("backbone", 0.0)


def measure(dataset: str, images: int, protocol: str, methods: str, device: str, seed: int) -> List[str]:
    """Table rows (markdown) of one dataset: one per method."""
    from harness.synthetic.segmentation import write_synthetic_dataset

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_dataset(dataset, os.path.join(tmp, "data"), num_images=images, size=SIZES[dataset],
                                       seed=seed)
        text_s = warm_text(dataset, protocol, device, os.path.join(tmp, "cache"))
        b16_proto = bf16_protocol(protocol, dataset, os.path.join(tmp, "protocols"))
        r32, p32 = run(dataset, root, protocol, methods, device, tmp, "fp32")
        r16, p16 = run(dataset, root, b16_proto, methods, device, tmp, "bf16")
        multi = len(r32) > 1
        for m, rec in r32.items():
            other = r16[m]
            assert rec.settings["precision"] == "fp32" and other.settings["precision"] == "bf16"
            s32, b32 = stage_seconds(rec)
            s16, b16 = stage_seconds(other)
            share = changed_share(os.path.join(p32, m) if multi else p32, os.path.join(p16, m) if multi else p16)
            rows.append(f"| {dataset} | {m} | {rec.metrics['mIoU']:.2f} | {other.metrics['mIoU']:.2f} | "
                        f"{other.metrics['mIoU'] - rec.metrics['mIoU']:+.2f} | {share:.3f} | {s32:.1f} | {s16:.1f} | "
                        f"{b32:.1f} | {b16:.1f} |")
        print(f"{dataset}: text encoded once in {text_s:.1f} s (cache shared by both precisions)", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="voc20,ade20k")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--methods", default="vanilla,naclip,sclip")
    ap.add_argument("--protocol", default="phreg")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    ap.add_argument("--out", default=None, help="append the markdown result to this file")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    datasets = [d for d in a.datasets.split(",") if d]
    unknown = [d for d in datasets if d not in SIZES]
    if unknown:
        raise SystemExit(f"--datasets {','.join(unknown)}: expected some of {', '.join(SIZES)}")
    load_before, t0 = load(), time.perf_counter()
    rows: List[str] = []
    for d in datasets:
        rows += measure(d, a.images, a.protocol, a.methods, a.device, a.seed)
    sizes = ", ".join(f"{d} {SIZES[d][0]}x{SIZES[d][1]}" for d in datasets)
    lines = [
        f"### bf16 vs fp32: `harness run ovss` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"`python benchmarks/precision_drift.py --datasets {a.datasets} --images {a.images} --methods {a.methods} "
        f"--protocol {a.protocol} --device {a.device}`. {machine(a.device)}. Load average (1/5/15 min) before "
        f"{load_before}, after {load()}; {time.perf_counter() - t0:.0f} s in all.",
        f"{a.images} generated images per dataset (about {sizes}, resized as the protocol says), random-init CLIP "
        f"ViT-B/16; one pass per precision with all methods sharing the trunk, so the times are per pass, not per "
        f"method; the relabelled share counts every pixel of the predictions, labelled or not.",
        "",
        "| dataset | method | mIoU fp32 | mIoU bf16 | drift (points) | pixels relabelled (%) | inference s fp32 | "
        "inference s bf16 | backbone s fp32 | backbone s bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
