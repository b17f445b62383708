"""Training step of the ``fast`` probes: version 1 (loss at full resolution), version 2 (loss on the head's
grid) and, for depth, version 3 (loss at the token grid) and version 4 (that loss on a random window of the grid).

Same machine, same run, same cached data and the same initial heads: the shipped ``fast`` protocols' grid
of five heads and batch 16. The cache is filled the way the evaluators fill it (fixed 512x512 views of
generated VOC-sized images for linear-seg, 416x544 NYU views for depth, random-init backbone), then

* v1 step: the version-1 loss -- every head's output upsampled to the label / depth view;
* v2 step: the version-2 loss -- token-grid histograms (one GEMM for the whole head grid) /
  the depth head's output grid (x4 the tokens) against masked-mean depth;
* v3 step (depth): the depth heads at the token grid, one GEMM for the whole head grid, against
  masked-mean depth pooled onto the tokens (depth ``fast`` protocol version 3);
* v4 step (depth): the v3 step on each view's random window of ``train_token_window`` of the grid's rows and
  columns (21x27 of 30x39; the shipped depth ``fast`` protocol, version 4);

each timed over whole trainer iterations (:class:`~harness.probes.trainer.ProbeTrainer`: batch loading
from the memory-mapped cache, forward, backward, AdamW), the versions alternating in rounds so that all see
the same load. It also times one full-resolution held-out
evaluation (what ``eval_fn`` does every ``eval_interval``) and a ViT-B/14 forward at the 518x518
padded crop, to set 4,000 iterations against the feature extraction of VOC train (1,464 images) and of
NYU train (estimated by token count).

Usage::

    python benchmarks/fast_probe.py                       # writes benchmarks/fast_probe.md
    python benchmarks/fast_probe.py --task depth --profile  # depth only; the linear-seg section is kept
    python benchmarks/fast_probe.py --v1-iters 2 --v2-iters 20 --task linear-seg
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: the shipped fast protocols' head grid and batch (harness/protocols/{linear-seg,depth}/fast.yaml)
HEADS, BATCH = 5, 16
#: the training-step versions the tables can hold (linear-seg: v1, v2; depth: v1 to v4)
VERSIONS = ("v1", "v2", "v3", "v4")
#: VOC2012 train, the set whose extraction the 4,000 iterations are compared with (DVT voc2012 config: 1,464)
VOC_TRAIN_IMAGES = 1464
#: VOC val images (1,449) and a 512-short-side test view of a 500x375 image: 683x512 -> 2 windows of 512/341
VOC_VAL_IMAGES = 1449
#: NYU train frames: the official labeled split (795) and the BTS split DVT trains on (24,231)
NYU_TRAIN_FRAMES = (795, 24231)
#: tokens of a 512 crop padded to 518 (37 x 37) and of a 416x544 NYU view padded to 420x546 (30 x 39), patch 14
TOKENS_VOC, TOKENS_NYU = 37 * 37, 30 * 39


def load() -> float:
    return os.getloadavg()[0]


def busy_share(seconds: float = 2.0) -> Optional[float]:
    """The share of all CPU time spent outside idle over ``seconds`` (Linux ``/proc/stat``), None elsewhere.

    Why not the load average alone: it counts tasks in uninterruptible sleep, so a VM's kernel threads can hold
    it near 1 while both cores are idle; this says whether another job was actually computing.
    """
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        (t0, i0), _, (t1, i1) = sample(), time.sleep(seconds), sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def trainer_for(heads, lrs, max_iters: int, work: str, name: str, proto: Dict[str, Any]):
    from harness.probes.schedules import Schedule
    from harness.probes.trainer import ProbeTrainer

    o = proto["optimizer"]
    return ProbeTrainer(heads, [f"lr={lr:g}" for lr in lrs], lrs, float(o["weight_decay"]), o["betas"],
                        o.get("grad_clip"), Schedule(proto["schedule"], int(proto["max_iters"])), max_iters,
                        os.path.join(work, f"{name}.ckpt.pt"), name, checkpoint_interval=10 ** 9,
                        log_interval=10 ** 9, progress=False)


def interleaved(rounds: int, lrs: List[float], work: str, proto: Dict[str, Any],
                runs: List[Dict[str, Any]]) -> List[float]:
    """Seconds per iteration of each run, timed in alternating rounds so that every run sees the same load.

    A run: ``heads``, ``per_round`` iterations, ``batches(offset)`` -> the trainer's ``batches`` callable for
    iterations offset.., and the ``fit`` keywords (``loss_fn`` / ``losses_fn``). Each round trains every run
    for its iterations with a fresh :class:`ProbeTrainer` (data loading, forward, backward, AdamW).
    """
    seconds, iters = [0.0] * len(runs), [0] * len(runs)
    for r in range(rounds):
        for k, run in enumerate(runs):
            n = int(run["per_round"])
            trainer = trainer_for(run["heads"], lrs, n, work, f"run{k}", proto)
            trainer.fit(run["batches"](r * n), **run["fit"])
            seconds[k] += trainer.train_seconds
            iters[k] += n
    return [s / max(1, i) for s, i in zip(seconds, iters)]


def seg_bench(args: argparse.Namespace, work: str, rows: List[Dict[str, Any]], notes: List[str]) -> None:
    from harness.compat.mmcv_ops import import_mmseg
    from harness.evaluators.linear_seg import seg_loss
    from harness.metrics.segmentation import IoUAccumulator
    from harness.models import build_dense_model
    from harness.probes.cache import FeatureCache
    from harness.probes.data import IGNORE_INDEX, register_transforms, seg_fixed_view_pipeline
    from harness.probes.extract import FixedViewSamples, fill_cache
    from harness.probes.features import dense_features, resize
    from harness.probes.heads import HeadBank, LinearSegHead, centre_batch, seg_grid_train_logits
    from harness.probes.targets import derive_cache, label_counts, token_seg_losses
    from harness.protocols import get_protocol
    from harness.registry import DATASETS
    from harness.synthetic.segmentation import write_demo_voc

    import_mmseg()
    register_transforms()
    proto = get_protocol("linear-seg", "fast").settings("voc21")
    scale, crop = proto["test_scale"], tuple(proto["crop_size"])
    root = write_demo_voc(os.path.join(work, "voc"), args.images, (375, 500), 0, "train")
    spec = DATASETS.get("voc21")
    ds = spec.build(root, "train", seg_fixed_view_pipeline(scale, crop))
    model = build_dense_model(args.backbone, "vanilla", random_init=True).eval()
    cache = FeatureCache(os.path.join(work, "seg-cache"), {"bench": 1}, {"patch": "float16", "label": "uint8"})
    t0 = time.time()
    fill_cache(cache, FixedViewSamples(ds, "seg", model.spec.mean_255, model.spec.std_255, pad_to=crop),
               lambda x: {"patch": dense_features(model, x).patch},
               lambda s: {"label": s["target"].numpy().astype(np.uint8)}, 8, 0, False, "cache")
    extract_s = (time.time() - t0) / len(cache)
    grid = tuple(cache.shape(0, "patch")[1:])
    k = spec.num_classes
    targets = FeatureCache(os.path.join(work, "seg-targets"), {"bench": 2}, {"counts": "float16"})
    t0 = time.time()
    derive_cache(cache, targets, lambda i: {"counts": label_counts(cache.get(i, "label"), grid, k, IGNORE_INDEX)
                                            .transpose(1, 2, 0)}, False, "targets")
    targets_s = (time.time() - t0) / len(cache)
    c = cache.shape(0, "patch")[0]
    lrs = [float(x) for x in proto["optimizer"]["lrs"]]
    torch.manual_seed(0)
    init = HeadBank([LinearSegHead(c, k) for _ in lrs])
    rng = np.random.default_rng(0)
    n_orders = args.rounds * max(args.v1_iters, args.v2_iters)
    order = [rng.permutation(len(cache))[:BATCH].tolist() for _ in range(n_orders)]

    def v1_batches(offset: int):
        def batches(start: int):
            for idx in order[offset + start:offset + args.v1_iters]:
                yield cache.stack(idx, "patch", torch.float32), cache.stack(idx, "label", torch.int64)
        return batches

    ppi = crop[0] * crop[1]

    def v2_batches(offset: int):
        def batches(start: int):
            for idx in order[offset + start:offset + args.v2_iters]:
                counts = targets.stack(idx, "counts", torch.float32)
                yield centre_batch(cache.stack_channels_first(idx, "patch")), counts.reshape(-1, k)
        return batches

    v1_heads, v2_heads = copy.deepcopy(init), copy.deepcopy(init)
    v1, v2 = interleaved(args.rounds, lrs, work, proto, [
        dict(heads=v1_heads, per_round=args.v1_iters, batches=v1_batches,
             fit=dict(loss_fn=lambda b, it, j: seg_loss(v1_heads.heads[j](b[0]), b[1]))),
        dict(heads=v2_heads, per_round=args.v2_iters, batches=v2_batches,
             fit=dict(loss_fn=None, losses_fn=lambda b, it: list(token_seg_losses(
                 seg_grid_train_logits(v2_heads.heads, b[0]), b[1], b[0].shape[0] * ppi))))])
    # one held-out evaluation at full resolution (the fast eval_fn: 5 heads, logits resized to 512x512)
    v2_heads.eval()
    t0 = time.time()
    accs = [IoUAccumulator(k, IGNORE_INDEX) for _ in lrs]
    with torch.no_grad():
        for s in range(0, len(cache), 8):
            idx = list(range(s, min(s + 8, len(cache))))
            feats, labels = cache.stack(idx, "patch", torch.float32), cache.stack(idx, "label", torch.int64)
            for acc, h in zip(accs, v2_heads.heads):
                acc.update(resize(h(feats), tuple(labels.shape[-2:])).argmax(1), labels)
    eval_s = (time.time() - t0) / len(cache)
    n_hold = round(proto["holdout_fraction"] * VOC_TRAIN_IMAGES)
    n_evals = int(proto["max_iters"]) // int(proto["eval_interval"])
    rows.append(dict(task="linear-seg", backbone=args.backbone, grid=f"{grid[0]}x{grid[1]}",
                     label=f"{crop[0]}x{crop[1]}",
                     v1=v1, v2=v2, v1_iters=args.rounds * args.v1_iters, v2_iters=args.rounds * args.v2_iters,
                     extract=extract_s,
                     targets=targets_s, eval=eval_s, max_iters=int(proto["max_iters"]), n_hold=n_hold,
                     n_evals=n_evals))
    notes.append(f"linear-seg held-out evaluation (full resolution, {HEADS} heads): {eval_s * 1000:.0f} ms per "
                 f"image; a 4,000-iteration VOC run evaluates {n_hold} held-out images {n_evals} times = "
                 f"{eval_s * n_hold * n_evals / 60:.1f} min.")


def depth_bench(args: argparse.Namespace, work: str, rows: List[Dict[str, Any]], notes: List[str]) -> None:
    from harness.compat.mmcv_ops import import_mmseg
    from harness.models import build_dense_model
    from harness.prepare.nyu import prepare_nyu
    from harness.probes.cache import FeatureCache
    from harness.probes.data import depth_fixed_view_pipeline, random_windows, register_transforms, window_size
    from harness.probes.extract import FixedViewSamples, fill_cache
    from harness.probes.features import dense_features, resize
    from harness.probes.heads import (
        DepthBinsHead,
        HeadBank,
        depth_head_input,
        depth_head_split_forward,
        depth_token_grid_train,
    )
    from harness.probes.losses import depth_loss, depth_losses
    from harness.probes.targets import derive_cache, masked_mean_pool
    from harness.protocols import get_protocol
    from harness.registry import DATASETS
    from harness.synthetic.nyu import write_synthetic_nyu

    import_mmseg()
    register_transforms()
    proto = get_protocol("depth", "fast").settings("nyu")
    crop, scale, up = tuple(proto["crop_size"]), float(proto["depth_rescale_factor"]), int(proto["upsample"])
    mat, splits = write_synthetic_nyu(os.path.join(work, "nyu_raw"), args.images, 2, seed=0)
    root = os.path.join(work, "nyu")
    prepare_nyu(mat, root, splits)
    ds = DATASETS.get("nyu").build(root, "train", depth_fixed_view_pipeline(scale, crop, proto["nyu_crop_box"]))
    model = build_dense_model(args.backbone, "vanilla", random_init=True).eval()
    cache = FeatureCache(os.path.join(work, "depth-cache"), {"bench": 3},
                         {"patch": "float16", "cls": "float16", "depth": "uint16"})

    def featurize(x):
        f = dense_features(model, x)
        return {"patch": f.patch, "cls": f.cls}

    t0 = time.time()
    fill_cache(cache, FixedViewSamples(ds, "depth", model.spec.mean_255, model.spec.std_255, pad_to=crop), featurize,
               lambda s: {"depth": np.clip(np.rint(s["target"].numpy() / scale), 0, 65535).astype(np.uint16)},
               4, 0, False, "cache")
    extract_s = (time.time() - t0) / len(cache)
    grid = tuple(cache.shape(0, "patch")[1:])
    out = (grid[0] * up, grid[1] * up)

    def pooled(name: str, size) -> FeatureCache:
        tg = FeatureCache(os.path.join(work, f"depth-targets-{name}"), {"bench": name}, {"depth": "float32"})
        return derive_cache(cache, tg, lambda i: {"depth": masked_mean_pool(
            np.asarray(cache.get(i, "depth"), np.float64) * scale, size)}, False, "targets")

    t0 = time.time()
    targets = pooled("output", out)
    targets_s = (time.time() - t0) / len(cache)
    t0 = time.time()
    tokens = pooled("token", grid)
    tokens_s = (time.time() - t0) / len(cache)
    c = cache.shape(0, "patch")[0]
    lrs = [float(x) for x in proto["optimizer"]["lrs"]]
    torch.manual_seed(0)
    init = HeadBank([DepthBinsHead(2 * c, int(proto["n_bins"]), float(proto["min_depth"]), float(proto["max_depth"]),
                                   up, norm_eps=float(proto["head"]["norm_eps"])) for _ in lrs])
    rng = np.random.default_rng(0)
    per_round = {"v1": args.depth_v1_iters, "v2": args.depth_v2_iters, "v3": args.depth_v3_iters,
                 "v4": args.depth_v4_iters}
    share = tuple(float(f) for f in proto["train_token_window"])  # v4: each step's window of the token grid
    window = window_size(grid, share)
    order = [rng.permutation(len(cache))[:BATCH].tolist()
             for _ in range(args.depth_rounds * max(per_round.values()))]
    warm = int(proto["sigloss_warmup_iters"])
    loss_kw = dict(warm_iters=warm, **proto["loss"])

    def batches_of(version: str):
        n = per_round[version]

        def make(offset: int):
            def batches(start: int):
                for j, idx in enumerate(order[offset + start:offset + n]):
                    if version == "v1":  # the full (B, 2C, h, w) input, depth at the 416x544 view
                        x = depth_head_input(cache.stack(idx, "patch", torch.float32),
                                             cache.stack(idx, "cls", torch.float32))
                        yield x, cache.stack(idx, "depth", torch.float32)[:, None] * scale
                    elif version == "v2":  # patch and CLS apart, depth pooled onto the head's output grid
                        yield ((cache.stack(idx, "patch", torch.float32), cache.stack(idx, "cls", torch.float32)),
                               targets.stack(idx, "depth", torch.float32)[:, None])
                    else:  # v3/v4: (C, B, h, w) in one pass per item, depth pooled onto the token grid
                        it = offset + start + j
                        wins = None if version == "v3" else random_windows(
                            grid, share, 0, [(it, s, i) for s, i in enumerate(idx)])  # v4: only the windows
                        yield ((cache.stack_channels_first(idx, "patch", wins), cache.stack(idx, "cls", torch.float32)),
                               tokens.stack(idx, "depth", torch.float32, wins)[:, None])
            return batches
        return make

    heads = {v: copy.deepcopy(init) for v in per_round}
    fits = {
        "v1": dict(loss_fn=lambda b, it, j: depth_loss(resize(heads["v1"].heads[j](b[0]), tuple(b[1].shape[-2:])),
                                                       b[1], it, **loss_kw)),
        "v2": dict(loss_fn=lambda b, it, j: depth_loss(depth_head_split_forward(heads["v2"].heads[j], *b[0]), b[1],
                                                       it, **loss_kw)),
        **{v: dict(loss_fn=None, losses_fn=lambda b, it, v=v: list(depth_losses(
            depth_token_grid_train(heads[v].heads, *b[0]), b[1], it, **loss_kw))) for v in ("v3", "v4")},
    }
    secs = interleaved(args.depth_rounds, lrs, work, proto, [
        dict(heads=heads[v], per_round=per_round[v], batches=batches_of(v), fit=fits[v]) for v in per_round])
    row = dict(task="depth", backbone=args.backbone, grid=f"{grid[0]}x{grid[1]}",
               label=f"{crop[0]}x{crop[1]} -> {out[0]}x{out[1]} (v2) / {grid[0]}x{grid[1]} (v3) / "
                     f"{window[0]}x{window[1]} window (v4)",
               extract=extract_s, targets=targets_s, tokens=tokens_s, max_iters=int(proto["max_iters"]))
    for v, sec in zip(per_round, secs):
        row[v], row[f"{v}_iters"] = sec, args.depth_rounds * per_round[v]
    # one held-out evaluation as the fast eval_fn does it: the full heads (x4), resized to the view, 5 accumulators
    from harness.metrics.depth import DepthAccumulator

    heads["v3"].eval()
    accs = [DepthAccumulator(float(proto["min_depth"]), float(proto["max_depth"]), eigen_crop=False) for _ in lrs]
    t0 = time.time()
    with torch.no_grad():
        for s0 in range(0, len(cache), 4):
            idx = list(range(s0, min(s0 + 4, len(cache))))
            gt = cache.stack(idx, "depth", torch.float32) * scale
            x = depth_head_input(cache.stack(idx, "patch", torch.float32), cache.stack(idx, "cls", torch.float32))
            for acc, pred in zip(accs, heads["v3"](x)):
                pred = resize(pred, tuple(gt.shape[-2:]))[:, 0]
                for j in range(len(idx)):
                    acc.update(pred[j], gt[j])
    eval_s = (time.time() - t0) / len(cache)
    n_hold = [round(float(proto["holdout_fraction"]) * n) for n in NYU_TRAIN_FRAMES]
    n_evals = int(proto["max_iters"]) // int(proto["eval_interval"])
    row.update(eval=eval_s, n_hold=n_hold, n_evals=n_evals)
    if args.profile:
        row["profile"] = {v: profile_step(heads[v], lrs, work, proto, batches_of(v)(0), fits[v])
                          for v in ("v2", "v3", "v4")}
    rows.append(row)


def profile_step(heads, lrs: List[float], work: str, proto: Dict[str, Any], batches, fit: Dict[str, Any],
                 top: int = 8) -> List[str]:
    """torch.profiler over one trainer iteration: the ``top`` operators by self CPU time, as table rows."""
    from torch.profiler import ProfilerActivity, profile

    trainer = trainer_for(heads, lrs, 1, work, "profile", proto)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.fit(batches, **fit)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [f"{e.key} {e.self_cpu_time_total / 1e6:.3f} s ({100 * e.self_cpu_time_total / total:.0f} %, "
            f"{e.count} calls)" for e in events[:top]]


def vit_b_forward(args: argparse.Namespace) -> float:
    """Seconds per image of a random-init ViT-B/14 (DINOv2 B) forward at the padded 512 crop (518x518)."""
    from harness.models import build_dense_model
    from harness.probes.features import dense_features

    model = build_dense_model("dinov2-b14", "vanilla", random_init=True).eval()
    x = torch.randn(args.vitb_batch, 3, 512, 512)
    dense_features(model, x)  # warm-up
    t0 = time.time()
    for _ in range(args.vitb_reps):
        dense_features(model, x)
    return (time.time() - t0) / (args.vitb_reps * args.vitb_batch)


def duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


SECTION_TITLES = {"linear-seg": "## linear-seg", "depth": "## depth"}


def replace_sections(path: str, header: List[str], sections: Dict[str, List[str]]) -> str:
    """Write ``header`` and the task sections to ``path``; sections of tasks not run this time are kept as the
    file had them (``--task depth`` does not erase the linear-seg measurements)."""
    old: Dict[str, List[str]] = {}
    if os.path.isfile(path):
        current = None
        with open(path) as f:
            for line in f.read().splitlines():
                task = next((t for t, title in SECTION_TITLES.items() if line == title), None)
                if task is not None:
                    current = task
                    old[current] = []
                if current is not None:
                    old[current].append(line)
    lines = list(header)
    for task in SECTION_TITLES:
        body = sections.get(task) or old.get(task)
        if body:
            while body and not body[-1].strip():
                body = body[:-1]
            lines += [""] + body
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="dinov2-s14", help="backbone of the cached features (random init)")
    ap.add_argument("--images", type=int, default=16, help="generated training images per task")
    ap.add_argument("--task", choices=("all", "linear-seg", "depth"), default="all",
                    help="which probes to time (the other's section of --out is kept)")
    ap.add_argument("--rounds", type=int, default=3, help="linear-seg timing rounds (v1 and v2 alternate)")
    ap.add_argument("--v1-iters", type=int, default=1, help="linear-seg v1 iterations per round")
    ap.add_argument("--v2-iters", type=int, default=15, help="linear-seg v2 iterations per round")
    ap.add_argument("--depth-rounds", type=int, default=3, help="depth timing rounds (v1 to v4 alternate)")
    ap.add_argument("--depth-v1-iters", type=int, default=1, help="depth v1 iterations per round")
    ap.add_argument("--depth-v2-iters", type=int, default=1, help="depth v2 iterations per round")
    ap.add_argument("--depth-v3-iters", type=int, default=30, help="depth v3 iterations per round")
    ap.add_argument("--depth-v4-iters", type=int, default=30, help="depth v4 iterations per round")
    ap.add_argument("--profile", action="store_true", help="also profile one depth v2, v3 and v4 iteration")
    ap.add_argument("--vitb-batch", type=int, default=2)
    ap.add_argument("--vitb-reps", type=int, default=2)
    ap.add_argument("--skip-depth", action="store_true", help="same as --task linear-seg")
    ap.add_argument("--out", default=os.path.join(HERE, "fast_probe.md"))
    args = ap.parse_args()
    if args.skip_depth:
        args.task = "linear-seg"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = tempfile.mkdtemp(prefix="fast_probe_")
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    busy_before = busy_share()
    load_before = os.getloadavg()
    t_start = time.time()
    if args.task in ("all", "linear-seg"):
        seg_bench(args, work, rows, notes)
    if args.task in ("all", "depth"):
        depth_bench(args, work, rows, notes)
    vitb = vit_b_forward(args)
    load_after = os.getloadavg()
    for r in rows:
        print(f"{r['task']:10s} " + "  ".join(f"{v} {r[v]:.4f} s/it ({r['v1'] / r[v]:.1f}x v1)"
                                               for v in VERSIONS if v in r), flush=True)
    device = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch " \
             f"{torch.__version__}, {torch.get_num_threads()} threads"
    run_line = (
        f"Generated by `{' '.join(['python benchmarks/fast_probe.py'] + sys.argv[1:])}` "
        f"({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC), {device}; {time.time() - t_start:.0f} s in all. "
        f"Load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, after: "
        f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; "
        + ("CPU busy before the run: unknown" if busy_before is None else
           f"CPU busy in the 2 s before the run: {100 * busy_before:.0f} %"
           + (" (other jobs were running, so absolute times are inflated)" if busy_before > 0.1 else " (idle)"))
        + ". The versions ran in the same process, alternating in rounds (so all saw the same load), on the same "
        "cache and the same initial heads.")
    header = [
        "# Fast probes: the v1 to v4 training steps",
        "",
        f"Cached features: `{args.backbone}` (random init), {args.images} generated training images per task "
        f"(VOC-sized 375x500 -> fixed 512x512 view; NYU 480x640 -> 416x544 view). Step = one trainer iteration "
        f"of the shipped `fast` protocol: {HEADS} heads (its learning-rate grid), batch {BATCH}, batch loading from "
        "the memory-mapped cache, forward, backward, AdamW. v1: head outputs upsampled to the label / depth view "
        "(seg: per-pixel cross-entropy at 512x512; depth: prediction resized to 416x544). v2: seg loss on the "
        "token grid against per-token label histograms, the grid as one GEMM with BatchNorm folded in; depth loss "
        "at the head's output grid (x4 the tokens) against masked-mean depth, CLS half of the conv as a per-image "
        "bias. v3 (depth only): the depth heads without their x4 upsampling, all five heads' logits as one GEMM "
        "over the shared token matrix, loss at the token grid against masked-mean depth. v4 (depth only): the v3 "
        "step on a random window of each view's token grid (the protocol's `train_token_window` share of its rows "
        "and columns), only the windows read from the cache.",
    ]

    def table(r: Dict[str, Any]) -> List[str]:
        """The row's versions as columns: s/iter, speed-up over v1, 4,000 iterations."""
        vs = [v for v in VERSIONS if v in r]
        cols = ([f"{v} s/iter (iters)" for v in vs] + [f"{v} / v1" for v in vs[1:]]
                + [f"4,000 iters {v}" for v in vs])
        cells = ([f"{r[v]:.4f} ({r[v + '_iters']})" for v in vs] + [f"**{r['v1'] / r[v]:.1f}x**" for v in vs[1:]]
                 + [duration(r[v] * r["max_iters"]) for v in vs])
        tg = f"{r['targets'] * 1000:.1f}" + (f" / {r['tokens'] * 1000:.1f}" if "tokens" in r else "")
        head = ["task", "token grid", "label / target", *cols, "extraction s/image", "targets ms/image"]
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                "| " + " | ".join([r["task"], r["grid"], r["label"], *cells, f"{r['extract']:.2f}", tg]) + " |"]

    sections: Dict[str, List[str]] = {}
    vitb_line = (f"ViT-B/14 (`dinov2-b14`, random init) forward at the padded 512 crop (518x518, 37x37 tokens): "
                 f"{vitb:.2f} s per image (batch {args.vitb_batch}, mean of {args.vitb_reps} timed batches after "
                 f"one warm-up, same load).")
    for r in rows:
        lines = [SECTION_TITLES[r["task"]], "", run_line, "", *table(r), "", vitb_line]
        if r["task"] == "linear-seg":
            seg_total = r["v2"] * r["max_iters"] + r["eval"] * r["n_hold"] * r["n_evals"]
            lines += [
                f"Extracting VOC train ({VOC_TRAIN_IMAGES} fixed views) takes about "
                f"**{vitb * VOC_TRAIN_IMAGES / 60:.1f} min** (forward only; decoding, resizing and writing the cache "
                f"come on top, and the val windows -- {VOC_VAL_IMAGES} images x 2 windows of 512 at a 512 short "
                "side -- cost twice that again).",
                f"The 4,000 linear-seg v2 iterations cost {r['v2'] * r['max_iters'] / 60:.1f} min "
                f"({seg_total / 60:.1f} min with the full-resolution held-out evaluations), against "
                f"{r['v1'] * r['max_iters'] / 3600:.1f} h for v1. With a ViT-B/14 cache (768 channels instead of "
                f"{384 if 's14' in args.backbone else 'the'} here) the v2 step's GEMM doubles; it stays "
                f"{'below' if 2 * r['v2'] * r['max_iters'] < vitb * VOC_TRAIN_IMAGES else 'above'} the extraction.",
                *notes]
        else:
            nyu = [vitb * TOKENS_NYU / TOKENS_VOC * n for n in NYU_TRAIN_FRAMES]
            v4 = r["v4"] * r["max_iters"]
            lines += [
                f"Depth: v2 is {r['v1'] / r['v2']:.1f}x, v3 {r['v1'] / r['v3']:.1f}x and v4 (shipped) "
                f"**{r['v1'] / r['v4']:.1f}x** the v1 step (target: >= 50x). 4,000 v4 iterations: **{duration(v4)}** "
                f"(v3 {duration(r['v3'] * r['max_iters'])}, v2 {duration(r['v2'] * r['max_iters'])}, "
                f"v1 {duration(r['v1'] * r['max_iters'])}), against a ViT-B/14 extraction of NYU train estimated "
                f"from the 518x518 forward scaled by token count ({TOKENS_NYU}/{TOKENS_VOC}): "
                f"{NYU_TRAIN_FRAMES[0]} official frames {duration(nyu[0])}, the {NYU_TRAIN_FRAMES[1]} BTS frames "
                f"{duration(nyu[1])} -- the v4 iterations cost "
                f"{'less' if v4 < nyu[0] else 'more'} than the smaller extraction. With a ViT-B/14 cache (768 "
                f"channels instead of {384 if 's14' in args.backbone else 'the'} here) the step's GEMMs double.",
                f"Targets: {r['targets'] * 1000:.1f} ms per view onto the head's output grid (v2), "
                f"{r['tokens'] * 1000:.1f} ms onto the token grid (v3), once per cached view.",
                f"Held-out evaluation (unchanged in v3 and v4: the full heads with their x4 upsampling, resized to the "
                f"416x544 view, {HEADS} heads): {r['eval'] * 1000:.0f} ms per view; a 4,000-iteration run evaluates "
                f"{r['n_evals']} times, on {r['n_hold'][0]} held-out views of the official split "
                f"({duration(r['eval'] * r['n_hold'][0] * r['n_evals'])}) or {r['n_hold'][1]} of the BTS split "
                f"({duration(r['eval'] * r['n_hold'][1] * r['n_evals'])})."]
            for v, ops in r.get("profile", {}).items():
                lines += ["", f"Profile of one {v} iteration (torch.profiler, self CPU time, top operators):", ""]
                lines += [f"- {op}" for op in ops]
        sections[r["task"]] = lines
    print(f"wrote {replace_sections(args.out, header, sections)}")


if __name__ == "__main__":
    main()
