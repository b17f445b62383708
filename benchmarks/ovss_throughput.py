"""OVSS throughput: the harness's batched evaluation vs a naive per-window loop, same model and images.

Prints (and writes to benchmarks/ovss_throughput.md) images/s for
  * naive:   one window at a time (batch 1), one method per pass, text re-encoded for every run;
  * harness: all windows of several images in shared batches, cached text, and (multi-method row)
             five methods in one pass sharing the backbone trunk;
plus the text-embedding time with a cold vs a warm cache, and the largest difference between the
naive and the harness logits (they must agree), and the backbone's achieved GFLOP/s (FLOPs counted by
``torch.utils.flop_counter``) against a plain matmul of the MLP's shape measured in the same run.
Random-init CLIP ViT-B/16: speed does not depend on the weights. Image size 448 x 597 is a VOC image
(500 x 375) resized to the phreg short side 448.

    python benchmarks/ovss_throughput.py --images 4 --device cpu
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch
import torch.nn.functional as F

from harness.models import attach_method, build_dense_model
from harness.ovss.inference import ImageJob, dense_logits, shared_trunk_features, slide_windows
from harness.runtime import device_description, select_device
from harness.text.encoder import class_queries, encode_names, queries_from_names
from harness.text.names import load_name_set

METHODS_5 = ("clip", "maskclip", "sclip", "clearclip", "naclip")


def naive_logits(model, img: torch.Tensor, text: torch.Tensor, crop: int, stride: int, ori) -> torch.Tensor:
    """SCLIP ``forward_slide`` as written: one window per forward pass, pad-and-add accumulation."""
    h, w = img.shape[-2:]
    preds = torch.zeros(1, text.shape[0], h, w, device=img.device)
    count = torch.zeros(1, 1, h, w, device=img.device)
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        c = img[None, :, y1:y2, x1:x2]
        f = model.forward_dense(c).patch.float()
        f = f / f.norm(dim=1, keepdim=True)
        lg = F.interpolate(torch.einsum("nchw,qc->nqhw", f, text), size=c.shape[-2:], mode="bilinear",
                           align_corners=False)
        preds += F.pad(lg, (x1, w - x2, y1, h - y2))
        count[:, :, y1:y2, x1:x2] += 1
    return F.interpolate(preds / count, size=ori, mode="bilinear", align_corners=False)[0]


def backbone_gflops(model, crops: torch.Tensor, device: torch.device, repeats: int = 2) -> tuple:
    """(GFLOP per forward of ``crops``, achieved GFLOP/s of the backbone, GFLOP/s of a same-size plain matmul).

    The matmul is the MLP's first layer at the same token count, (B*L, D) @ (D, 4D), where a ViT-B spends
    most of its FLOPs: how close the whole forward gets to it says what attention, norms and glue cost.
    """
    from torch.utils.flop_counter import FlopCounterMode

    # counted on an input that requires grad: otherwise nn.MultiheadAttention (open_clip's blocks) takes its fused
    # inference fast path, an op the counter has no formula for, and its projections would go uncounted
    with torch.enable_grad(), FlopCounterMode(display=False) as fc:
        model.forward_dense(crops.detach().requires_grad_(True))
    flops = fc.get_total_flops()
    d = model.backbone.width
    p = model.spec.patch_size
    tokens = 1 + (crops.shape[-2] // p) * (crops.shape[-1] // p)
    if device.type == "cpu":  # the counter has no formula for CPU's fused SDPA op: add q kᵀ and a v, 2·2·L²·D per block
        flops += model.backbone.num_blocks * crops.shape[0] * 4 * tokens * tokens * d
    with torch.inference_mode():
        model.forward_dense(crops)  # warm-up
        sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            model.forward_dense(crops)
        sync(device)
        bb_s = (time.perf_counter() - t) / repeats
        tokens *= crops.shape[0]
        a = torch.randn(tokens, d, device=device)
        w = torch.randn(d, 4 * d, device=device)
        a @ w
        sync(device)
        n = 20
        t = time.perf_counter()
        for _ in range(n):
            a @ w
        sync(device)
        mm_s = (time.perf_counter() - t) / n
    return flops / 1e9, flops / bb_s / 1e9, 2 * tokens * d * 4 * d / mm_s / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=2, default=(448, 597))
    ap.add_argument("--crop", type=int, default=336)
    ap.add_argument("--stride", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "ovss_throughput.md"))
    a = ap.parse_args()
    device = select_device(a.device)
    torch.manual_seed(0)
    base = build_dense_model("clip-b16-openai", "naclip", random_init=True).to(device)
    models = {m: (base if m == "naclip" else attach_method(base.backbone, m)) for m in METHODS_5}
    names = load_name_set("sclip", "voc21")
    imgs = [torch.randn(3, *a.size, device=device) for _ in range(a.images)]
    ori = (375, 500)
    rows = []

    with torch.inference_mode(), tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        q = class_queries(base, names, "openai_imagenet_80", device, cache_dir=cache)
        sync(device)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        q2 = class_queries(base, names, "openai_imagenet_80", device, cache_dir=cache)
        sync(device)
        warm = time.perf_counter() - t
        assert q2.cache_hit and torch.equal(q.embeddings.cpu(), q2.embeddings.cpu())
        text = q.embeddings
        n_prompts = len(queries_from_names(names)[0]) * 80

        # naive: text re-encoded per run (no cache), then one window at a time
        t = time.perf_counter()
        encode_names(base, queries_from_names(names)[0], "openai_imagenet_80", device)
        sync(device)
        text_naive = time.perf_counter() - t
        t = time.perf_counter()
        naive = [naive_logits(base, im, text, a.crop, a.stride, ori) for im in imgs]
        sync(device)
        naive_s = time.perf_counter() - t

        # harness, one method
        jobs = [ImageJob(im, ori) for im in imgs]
        t = time.perf_counter()
        ours = dense_logits(shared_trunk_features([base]), jobs, text, "slide", a.crop, a.stride, a.batch_size)[0]
        sync(device)
        ours_s = time.perf_counter() - t
        diff = max((x - y).abs().max().item() for x, y in zip(naive, ours))

        # five methods: naive = five separate passes; harness = one pass sharing the trunk
        t = time.perf_counter()
        dense_logits(shared_trunk_features(list(models.values())), jobs, text, "slide", a.crop, a.stride,
                     a.batch_size)
        sync(device)
        ours5_s = time.perf_counter() - t

    crops = torch.randn(a.batch_size, 3, a.crop, a.crop, device=device)  # outside inference mode: see below
    gflop, bb_rate, mm_rate = backbone_gflops(base, crops, device)

    n = a.images
    wins = len(slide_windows(a.size[0], a.size[1], a.crop, a.stride))
    rows.append(("naive loop, 1 method (batch 1)", n / naive_s, f"{naive_s:.1f} s + text re-encode {text_naive:.1f} s"))
    rows.append((f"harness, 1 method (batch {a.batch_size})", n / ours_s, f"{ours_s:.1f} s, text from cache"))
    rows.append(("naive loop, 5 methods (5 passes, est.)", n / (5 * naive_s), f"{5 * naive_s:.1f} s"))
    rows.append(("harness, 5 methods in one pass", n / ours5_s, f"{ours5_s:.1f} s"))
    lines = [
        f"### OVSS throughput ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {device_description(device)}, "
        f"torch {torch.__version__}."
        f" Model: random-init CLIP ViT-B/16 (clip-b16-openai architecture), NACLIP last block."
        f" {n} images of {a.size[0]}x{a.size[1]}, {wins} windows of {a.crop} (stride {a.stride}) each.",
        "",
        "| setting | images/s | time |",
        "|---|---|---|",
        *[f"| {r[0]} | {r[1]:.3f} | {r[2]} |" for r in rows],
        "",
        f"Text embeddings (VOC21 SCLIP name set, {n_prompts} prompts): cold cache {cold:.1f} s, warm cache "
        f"{warm * 1000:.0f} ms.",
        f"Largest |naive - harness| logit difference: {diff:.2e}.",
        f"Backbone (NACLIP, batch {a.batch_size} of {a.crop}x{a.crop}): {gflop:.1f} GFLOP per batch, "
        f"{bb_rate:.1f} GFLOP/s achieved; plain matmul of the MLP's shape in the same run: {mm_rate:.1f} GFLOP/s "
        f"(backbone at {100 * bb_rate / mm_rate:.0f}% of it).",
    ]
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    with open(a.out, "w") as f:
        f.write(text_out)


if __name__ == "__main__":
    main()
