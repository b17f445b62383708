"""The ``harness`` command line: run, list, data, report, demo, sensitivity.

Errors the user can fix (missing data, weights, unknown names, bad options) print one message and exit
with status 2; a traceback appears only with ``--debug``. Ctrl-C and SIGTERM save partial state and exit 130 / 143
(README "When things go wrong"). Heavy imports (torch, mmseg, open_clip) happen
inside the commands, so ``harness --help`` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

#: when this module was imported: the start of a command-line run for ``--profile`` (Python's own start-up before
#: it is not counted)
_LOADED_AT = time.perf_counter()


class _Tasks:
    """The evaluator registry's names, read only when argparse checks or lists them.

    Why: the task list is the registry's (a new evaluator is one decorated class), but importing the
    evaluators pulls in torch, and ``harness --help`` must stay instant.
    """

    def _names(self) -> List[str]:
        from .registry import EVALUATORS

        return EVALUATORS.names()

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._names())


TASKS = _Tasks()
#: ``harness distill NAME`` -> the module whose ``run(args) -> int`` trains it
DISTILLERS = {"phreg": "harness.distill.phreg", "dvt": "harness.distill.dvt",
              "unirefiner": "harness.distill.unirefiner"}
KINDS = ("backbones", "methods", "datasets", "evaluators", "protocols")


def _parse_params(items: Sequence[str]) -> Dict[str, Any]:
    """``--param sigma=3 --param foo=bar`` -> {"sigma": 3.0, "foo": "bar"} (YAML scalars)."""
    import yaml

    from .errors import ConfigError

    out: Dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"--param {it!r}: expected NAME=VALUE")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _split(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _model_options(p: argparse.ArgumentParser) -> None:
    """Where the backbone's weights come from, and the device: the same for every command that builds one."""
    p.add_argument("--weights", default=None, metavar="FILE", help="weights file instead of the local caches")
    p.add_argument("--random-init", action="store_true", help="same architecture, random weights (tests, demo)")
    p.add_argument("--download", action="store_true", help="allow fetching missing weights (needs network)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description="Benchmark dense features of (cleaned) ViTs.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    from . import __version__

    p.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="evaluate backbone x method on a dataset under a protocol",
                       description="Evaluate; comma-separated --method/--dataset values run each combination "
                                   "(one --data-root per dataset, comma-separated in the same order).")
    r.add_argument("task", choices=TASKS, metavar="TASK",
                   help="task: an evaluator's name (harness list evaluators: ovss, linear-seg, depth, artifacts)")
    r.add_argument("--backbone", required=True, help="backbone id (harness list backbones)")
    r.add_argument("--method", default="vanilla",
                   help="method name(s), comma-separated; compose parts with + (ttr+naclip, naclip+tta); "
                        "see harness list methods")
    r.add_argument("--dataset", required=True, help="dataset name(s), comma-separated (harness list datasets)")
    r.add_argument("--data-root", required=True, help="dataset root(s), comma-separated like --dataset")
    r.add_argument("--protocol", default=None, help="protocol id or YAML path (default: the task's default)")
    r.add_argument("--split", default=None, help="split to evaluate (default: val, test for nyu)")
    _model_options(r)
    r.add_argument("--method-weights", default=None, metavar="FILE|PART=FILE,...",
                   help="weights of the method (a TTR neuron file, a denoiser, a student); for a composition "
                        "with several weighted parts PART=FILE,PART=FILE")
    r.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter (PART.NAME=VALUE picks the part of a composition)")
    r.add_argument("--batch-size", type=int, default=0, help="windows per backbone batch (0 = auto)")
    r.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    r.add_argument("--limit", type=int, default=None, help="first N images only (smoke runs; recorded)")
    r.add_argument("--results-dir", default="results")
    r.add_argument("--cache-dir", default=None, help="text/feature cache (default $HARNESS_CACHE or ~/.cache/harness)")
    r.add_argument("--force", action="store_true", help="re-run even if a finished record exists")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--save-predictions", default=None, metavar="DIR",
                   help="ovss: also write each prediction as a PNG of class indices into DIR")
    r.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail",
                   help="a corrupt/truncated image or label map, or one of another size: stop with its name "
                        "(fail, default) or leave it out, list it in the record and mark the record partial (skip)")
    r.add_argument("--profile", action="store_true",
                   help="ovss: print where the run's wall time went (imports, model build, dataset screening, text, "
                        "data loading, backbone, upsampling, post-processing, PAMR, metric, records) and store it "
                        "in the record (settings.profile)")

    su = sub.add_parser("suite", help="run a matrix of backbones x methods x datasets from a YAML file",
                        description="Run every combination listed in a suite file (see configs/).")
    su.add_argument("file")
    su.add_argument("--data-dir", required=True, help="folder the suite's dataset roots are relative to")
    su.add_argument("--weights-dir", default=".", help="folder the suite's method_weights files are relative to")
    for flag in ("--random-init", "--force", "--no-progress", "--download"):
        su.add_argument(flag, action="store_true")
    su.add_argument("--limit", type=int, default=None)
    su.add_argument("--device", default="auto")
    su.add_argument("--workers", type=int, default=2)
    su.add_argument("--batch-size", type=int, default=0)
    su.add_argument("--results-dir", default="results")
    su.add_argument("--cache-dir", default=None)
    su.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail",
                    help="passed to every run: stop at a corrupt or mismatched image (fail) or leave it out, list it "
                         "in the record and mark the record partial (skip)")
    su.add_argument("--launcher", choices=("inline", "local", "slurm"), default="inline",
                    help="inline: run here, one after another (default); local: one submitit process per cell; "
                         "slurm: one Slurm job per cell (a job array); then `harness report` gathers the records")
    su.add_argument("--partition", default=None, help="slurm: the partition the jobs go to")
    su.add_argument("--gpus", type=int, default=0, help="local/slurm: GPUs per job (one task per GPU, DDP)")
    su.add_argument("--time", type=int, default=240, metavar="MINUTES", help="local/slurm: time limit per job")
    su.add_argument("--cpus", type=int, default=8, help="local/slurm: CPUs per job")
    su.add_argument("--mem-gb", type=int, default=None, help="local/slurm: memory per job")
    su.add_argument("--max-parallel", type=int, default=0, help="slurm: most array jobs running at once (0 = any)")
    su.add_argument("--jobs-dir", default=None, help="local/slurm: submitit logs and pickles "
                                                      "(default <results-dir>/jobs)")
    su.add_argument("--wait", action="store_true", help="slurm: wait for the jobs and report failed cells "
                                                         "(local always waits)")

    t = sub.add_parser("ttr", help="test-time registers: find register neurons")
    tsub = t.add_subparsers(dest="ttr_command", required=True)
    fn = tsub.add_parser("find-neurons", help="rank MLP units by their activation on high-norm tokens",
                         description="Find the register neurons of a backbone (Jiang et al. 2025) and write the "
                                     "neuron file that `--method ttr --method-weights FILE` reads.")
    fn.add_argument("--backbone", required=True, help="backbone id (harness list backbones)")
    fn.add_argument("--images", required=True, metavar="DIR", help="folder of images (searched recursively)")
    fn.add_argument("--out", required=True, metavar="FILE", help="neuron file to write (JSON)")
    fn.add_argument("--layer-limit", type=int, default=None,
                    help="highest block (0-based) whose units may be chosen (default: the authors' per backbone)")
    fn.add_argument("--top-k", type=int, default=None, help="number of neurons (default: the authors')")
    fn.add_argument("--norm-threshold", type=float, default=None,
                    help="residual norm above which a token is an outlier (default: the authors')")
    fn.add_argument("--detect-layer", type=int, default=None,
                    help="block whose output norms mark outliers; negative counts from the end (default: -1, "
                         "-2 for DINOv2-L)")
    fn.add_argument("--num-images", type=int, default=100, help="images used (the authors' notebook: 100)")
    fn.add_argument("--resolution", type=int, default=224, help="resize + centre crop size (the authors': 224)")
    fn.add_argument("--batch-size", type=int, default=8)
    _model_options(fn)

    ds = sub.add_parser("distill", help="train a cleaner's weights (PH-Reg student, DVT denoiser, UniRefiner "
                                        "LoRA) on an image folder",
                        description="Distil a cleaner for a backbone from unlabelled images; the output loads with "
                                    "--method NAME --method-weights FILE.")
    ds.add_argument("cleaner", choices=DISTILLERS, help="what to train")
    ds.add_argument("--backbone", required=True, help="backbone id (harness list backbones)")
    ds.add_argument("--images", required=True, metavar="DIR", help="folder of training images (recursive)")
    ds.add_argument("--out", required=True, metavar="FILE", help="output weights file")
    ds.add_argument("--steps", type=int, default=None, help="optimisation steps (overrides --epochs)")
    ds.add_argument("--epochs", type=int, default=None, help="passes over the images (default: the recipe's)")
    ds.add_argument("--batch-size", type=int, default=None, help="images per step (default: the recipe's)")
    ds.add_argument("--num-images", type=int, default=None, help="use only the first N images")
    ds.add_argument("--resolution", type=int, default=None, help="training crop (default: the recipe's)")
    ds.add_argument("--stage", default=None, help="dvt: 1 (per-image neural fields), 2 (denoiser) or all")
    ds.add_argument("--views", type=int, default=None, help="dvt stage 1: random crops per image (default 768)")
    ds.add_argument("--stage1-steps", type=int, default=None,
                    help="dvt stage 1: fitting steps per batch of images (default 25000); --steps is stage 2's")
    ds.add_argument("--fill", default=None, help="unirefiner: ring filler zero|uniform|normal (default zero)")
    ds.add_argument("--ah-layers", default=None, metavar="START-END|off",
                    help="unirefiner: teacher blocks of the attention-hijack detector (default: by depth, see README)")
    ds.add_argument("--reference-image", default=None, metavar="FILE",
                    help="unirefiner: the fixed reference image (default: a generated one)")
    ds.add_argument("--uniformity", type=float, default=None, help="unirefiner: uniformity strength (default 0.3)")
    ds.add_argument("--fp-gp-cosine", type=float, default=None, metavar="C",
                    help="unirefiner: reject fixed-pattern/global-proxy tokens at cosine >= C instead of the recipes' "
                         "z-score rule (mean + 0.5 std); the authors' code has both modes")
    ds.add_argument("--lr", type=float, default=None,
                    help="unirefiner: learning rate at batch 16, scaled by batch/16 (default 1e-4)")
    ds.add_argument("--checkpoint-every", type=int, default=100, help="steps between resumable checkpoints")
    ds.add_argument("--seed", type=int, default=0)
    _model_options(ds)
    ds.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    ds.add_argument("--no-progress", action="store_true")

    vz = sub.add_parser("viz", help="pictures of dense features, one column per method, and an index.html",
                        description="Per image, side by side for each method (PH-Reg Fig. 1/4 layout): the image, "
                                    "a PCA (or UMAP) of the dense features fitted jointly over all methods and "
                                    "images, the token norms and, for CLIP ids, a text query's heatmap and the "
                                    "predicted segmentation. Writes one PNG per image and OUT/index.html.")
    vz.add_argument("--backbone", required=True, help="backbone id (harness list backbones)")
    vz.add_argument("--method", default="vanilla", help="method name(s), comma-separated; compositions with +")
    vz.add_argument("--images", required=True, metavar="DIR", help="folder of images (searched recursively)")
    vz.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs and index.html")
    vz.add_argument("--query", default=None, help="CLIP ids: the text query of the heatmap row, used verbatim "
                                                  "(default: 'a photo of a <class 1 of --names>.')")
    vz.add_argument("--names", default=None, metavar="KEY|FILE",
                    help="CLIP ids: classes of the segmentation row: a name-set key (voc21, ade20k, ...; "
                         "default voc21) or a file with one class per line")
    vz.add_argument("--umap", action="store_true", help="UMAP instead of PCA (needs pip install 'harness[viz]')")
    vz.add_argument("--resolution", type=int, default=None, help="short side in pixels (default 448)")
    vz.add_argument("--limit", type=int, default=None, help="first N images only")
    _model_options(vz)
    vz.add_argument("--method-weights", default=None, metavar="FILE|PART=FILE,...", help="weights of the method(s)")
    vz.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="method parameter")
    vz.add_argument("--cache-dir", default=None, help="text cache (default $HARNESS_CACHE or ~/.cache/harness)")
    vz.add_argument("--no-progress", action="store_true")

    ls = sub.add_parser("list", help="list registered names")
    ls.add_argument("kind", choices=KINDS)

    d = sub.add_parser("data", help="verify or prepare datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("verify", help="check a dataset's layout and image count")
    v.add_argument("name")
    v.add_argument("--root", required=True)
    v.add_argument("--split", default=None)
    pr = dsub.add_parser("prepare", help="build derived label maps (coco_object, coco_stuff, context, nyu)")
    pr.add_argument("name", choices=("coco_object", "coco_stuff", "context", "nyu"))
    pr.add_argument("--root", "--out", dest="root", required=True,
                    help="dataset root (coco_stuff164k, VOCdevkit/VOC2010), or the output folder for nyu")
    pr.add_argument("--json", default=None, help="context: trainval_merged.json; coco_object: instances_val2017.json "
                                                 "for the pycocotools fallback")
    pr.add_argument("--mat", default=None, help="nyu: nyu_depth_v2_labeled.mat")
    pr.add_argument("--splits", default=None, help="nyu: splits.mat (official 795/654 split)")
    pr.add_argument("--bts-root", default=None, help="nyu: the BTS 'sync' folder; its frames become the train split "
                                                     "(the depth probes' faithful protocol trains on them)")
    pr.add_argument("--bts-split", default=None, help="nyu: BTS train_test_inputs/nyudepthv2_train_files_with_gt.txt")
    pr.add_argument("--copy", action="store_true", help="nyu: copy the BTS files instead of symlinking them")

    rep = sub.add_parser("report", help="write results/leaderboard.csv and results/LEADERBOARD.md")
    rep.add_argument("--results-dir", default="results")
    rep.add_argument("--published-dir", default=None,
                     help="published-number CSVs (default: <results-dir>/published, ./results/published)")

    demo = sub.add_parser("demo", help="tiny end-to-end run on generated VOC-layout data, random weights")
    demo.add_argument("--out", default="demo_output", help="folder for the demo data and results")
    demo.add_argument("--images", type=int, default=4)
    demo.add_argument("--device", default="auto")

    se = sub.add_parser("sensitivity", help="one method under every protocol and one knob at a time around one",
                        description="Run one method on one dataset under every registered protocol of the task "
                                    "and under variants of --protocol that change one --knobs value each; writes "
                                    "sensitivity.csv/.md/.png to --out (rows are run records in --results-dir).")
    se.add_argument("--task", default="ovss", help="task (ovss: the knob grid is OVSS settings)")
    se.add_argument("--backbone", required=True, help="backbone id (harness list backbones)")
    se.add_argument("--method", required=True, help="method name (harness list methods)")
    se.add_argument("--dataset", required=True, help="dataset name (harness list datasets)")
    se.add_argument("--data-root", required=True, help="dataset root")
    se.add_argument("--protocol", default=None, help="protocol id or YAML path to vary (default: the task's default)")
    se.add_argument("--knobs", default="resize,crop,stride,logit_scale,prob_thd,pamr,name_set",
                    help="comma-separated knobs to vary one at a time ('' for none)")
    se.add_argument("--no-other-protocols", action="store_true", help="only --protocol and its variants")
    se.add_argument("--out", default="sensitivity", help="folder for the variant protocols, table and plot")
    _model_options(se)
    se.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="method parameter")
    se.add_argument("--split", default="val")
    se.add_argument("--batch-size", type=int, default=0)
    se.add_argument("--workers", type=int, default=2)
    se.add_argument("--limit", type=int, default=None, help="first N images only (smoke runs; recorded)")
    se.add_argument("--results-dir", default="results")
    se.add_argument("--cache-dir", default=None)
    se.add_argument("--force", action="store_true", help="re-run even if finished records exist")
    se.add_argument("--no-progress", action="store_true")
    return p


def cmd_run(a: argparse.Namespace) -> int:
    from .profiling import StageTimer

    timer = StageTimer(enabled=bool(getattr(a, "profile", False)))
    timer.started = getattr(a, "started", timer.started)  # main()'s start: argument parsing imports the registry
    from .errors import ConfigError
    from .evaluators.base import RunConfig
    from .registry import EVALUATORS
    from .results.summary import format_record

    methods, datasets, roots = _split(a.method), _split(a.dataset), _split(a.data_root)
    if len(roots) != len(datasets):
        raise ConfigError(f"--data-root has {len(roots)} entries for {len(datasets)} datasets; give one per dataset")
    params = _parse_params(a.param)
    if timer.enabled and a.task != "ovss":
        raise ConfigError(f"--profile: only the ovss task is profiled so far (got task {a.task!r})")
    evaluator = EVALUATORS.get(a.task)()
    timer.add("imports", time.perf_counter() - timer.started)  # everything up to here: parsing and imports
    split = a.split or ("test" if a.task == "depth" else "val")
    from .models import parse_method_weights

    method_weights = parse_method_weights(a.method_weights)
    for ds, root in zip(datasets, roots):
        cfg = RunConfig(task=a.task, backbone=a.backbone, method=methods[0], dataset=ds,
                        data_root=os.path.expanduser(root), method_params=params, split=split, protocol=a.protocol,
                        weights=a.weights, method_weights=method_weights, random_init=a.random_init,
                        allow_download=a.download, device=a.device,
                        batch_size=a.batch_size, num_workers=a.workers, limit=a.limit, results_dir=a.results_dir,
                        cache_dir=a.cache_dir, force=a.force, seed=a.seed, progress=not a.no_progress,
                        save_predictions=a.save_predictions, on_bad_image=a.on_bad_image,
                        profiler=timer if timer.enabled else None)
        recs = evaluator.run_methods(cfg, methods)  # OVSS: one pass sharing data, text and trunk
        wall = timer.wall()
        for rec in recs:
            print(format_record(rec))
        if timer.enabled:
            print(timer.format(f"profile ({a.task} {ds}, {','.join(methods)})", wall))
            timer = StageTimer()  # the next dataset gets its own breakdown (from now: its imports are done)
    return 0


def cmd_suite(a: argparse.Namespace) -> int:
    """Expand a suite YAML (task, protocol, backbones, methods, datasets: {name: root}, and optionally
    method_weights: {backbone: {part: file}}) into runs; one pass per backbone and dataset list. A file may hold
    several suites as YAML documents separated by ``---`` (e.g. one per task); all are checked before any runs."""
    import yaml

    from .errors import ConfigError

    try:
        with open(a.file) as f:
            suites = [s for s in yaml.safe_load_all(f) if s is not None] or [None]
    except OSError as e:
        raise ConfigError(f"cannot read suite file {a.file}: {e}") from e
    need = ("task", "backbones", "methods", "datasets")
    for suite in suites:
        if not isinstance(suite, dict) or any(k not in suite for k in need):
            raise ConfigError(f"suite file {a.file} must define {', '.join(need)} (see configs/)")
        unknown = set(suite) - {*need, "protocol", "method_weights"}
        if unknown:
            raise ConfigError(f"suite file {a.file}: unknown key(s) {', '.join(sorted(unknown))}")
    if a.launcher != "inline":
        return _launch_suites(a, suites)
    for suite in suites:
        _run_suite(a, suite)
    return 0


def _run_suite(a: argparse.Namespace, suite: dict) -> None:
    """The runs of one (checked) suite document."""
    datasets = dict(suite["datasets"])
    for backbone in suite["backbones"]:
        cmd_run(build_parser().parse_args(_suite_argv(a, suite, backbone, suite["methods"], datasets)))


def _launch_suites(a: argparse.Namespace, suites: List[dict]) -> int:
    """``--launcher local|slurm``: every (backbone, method, dataset) cell of every suite becomes one submitit job."""
    from .launcher import Cell, JobSettings, submit_cells, wait_for

    for key in ("data_dir", "weights_dir", "results_dir", "cache_dir"):  # jobs may start in another folder
        if getattr(a, key):
            setattr(a, key, os.path.abspath(getattr(a, key)))
    cells = [Cell(f"{b}/{m}/{d}", _suite_argv(a, suite, b, [m], {d: root}))
             for suite in suites for b in suite["backbones"] for m in suite["methods"]
             for d, root in dict(suite["datasets"]).items()]
    settings = JobSettings(folder=os.path.abspath(a.jobs_dir or os.path.join(a.results_dir, "jobs")),
                           partition=a.partition, gpus=a.gpus, time_min=a.time, cpus=a.cpus, mem_gb=a.mem_gb,
                           max_parallel=a.max_parallel)
    jobs = submit_cells(main, cells, a.launcher, settings)
    for job, cell in zip(jobs, cells):
        print(f"submitted {cell.name}: job {job.job_id}")
    if a.launcher == "slurm" and not a.wait:
        print(f"logs in {settings.folder}; when the jobs are done: harness report --results-dir {a.results_dir}")
        return 0
    failed = wait_for(jobs, cells)
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    print(f"{len(cells) - len(failed)} of {len(cells)} cells finished; "
          f"harness report --results-dir {a.results_dir} gathers them")
    return 1 if failed else 0


def _suite_argv(a: argparse.Namespace, suite: dict, backbone: str, methods: List[str],
                datasets: Dict[str, str]) -> List[str]:
    """The ``harness run`` arguments of ``methods`` x ``datasets`` ({name: root under --data-dir}) on ``backbone``."""
    from .errors import ConfigError

    args = ["run", str(suite["task"]), "--backbone", backbone, "--method", ",".join(methods),
            "--dataset", ",".join(datasets),
            "--data-root", ",".join(os.path.join(a.data_dir, r) for r in datasets.values()),
            "--device", a.device, "--workers", str(a.workers), "--batch-size", str(a.batch_size),
            "--results-dir", a.results_dir]
    if suite.get("protocol"):
        args += ["--protocol", str(suite["protocol"])]
    files = (suite.get("method_weights") or {}).get(backbone) or {}
    if not isinstance(files, dict):
        raise ConfigError(f"suite file {a.file}: method_weights.{backbone} must map method parts to files")
    if files:  # relative to --weights-dir
        args += ["--method-weights", ",".join(f"{part}={os.path.join(a.weights_dir, str(path))}"
                                              for part, path in files.items())]
    if a.limit:
        args += ["--limit", str(a.limit)]
    if a.cache_dir:
        args += ["--cache-dir", a.cache_dir]
    if getattr(a, "on_bad_image", "fail") != "fail":
        args += ["--on-bad-image", a.on_bad_image]
    args += [f for f, on in (("--random-init", a.random_init), ("--force", a.force),
                             ("--no-progress", a.no_progress), ("--download", a.download)) if on]
    return args


def cmd_list(a: argparse.Namespace) -> int:
    from .registry import BACKBONES, DATASETS, EVALUATORS, METHODS, describe

    if a.kind == "protocols":
        from .protocols import list_protocols

        for pr in list_protocols():
            star = " (default)" if pr.default_for_task else ""
            print(f"{pr.key:<22} v{pr.version}{star}  {pr.description.splitlines()[0][:90]}")
        return 0
    reg = {"backbones": BACKBONES, "methods": METHODS, "datasets": DATASETS, "evaluators": EVALUATORS}[a.kind]
    for name, obj in reg.items():
        if a.kind == "backbones":
            text = f"{obj.arch} / {obj.weights_tag}: {obj.description}"
            text += f" [note: {obj.note}]" if obj.note else ""
        elif a.kind == "methods":
            touches = ", ".join(obj.TOUCHES) or "nothing"
            weights = f"; --method-weights {obj.WEIGHTS}" if obj.WEIGHTS else ""
            text = f"[{touches}{weights}] {describe(obj)}"
        else:
            text = describe(obj)
        aliases = reg.aliases_of(name)
        print(f"{name:<22} {text}" + (f"  (aliases: {', '.join(aliases)})" if aliases else ""))
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    from .errors import DataError
    from .registry import DATASETS

    if a.data_command == "verify":
        spec = DATASETS.get(a.name)
        split = a.split or ("test" if "test" in spec.splits and "val" not in spec.splits else "val")
        problems = spec.verify(os.path.expanduser(a.root), split)
        if problems:
            print(f"{a.name} ({split}) at {a.root}: NOT OK")
            for pr in problems:
                print(f"  - {pr}")
            return 1
        print(f"{a.name} ({split}) at {a.root}: OK, {spec.split(split).count} images")
        return 0
    from .prepare import labels

    root = os.path.expanduser(a.root)
    if a.name == "coco_object":
        summary = (labels.prepare_coco_object_from_instances(root, a.json) if a.json
                   else labels.prepare_coco_object(root))
    elif a.name == "coco_stuff":
        summary = labels.prepare_coco_stuff(root)
    elif a.name == "context":
        if not a.json:
            raise DataError("harness data prepare context needs --json trainval_merged.json "
                            "(PASCAL-Context annotations, see README 'Datasets')")
        summary = labels.prepare_context(root, a.json)
    else:
        from .prepare.nyu import prepare_nyu

        if not a.mat:
            raise DataError("harness data prepare nyu needs --mat nyu_depth_v2_labeled.mat (see README 'Datasets')")
        summary = prepare_nyu(a.mat, root, a.splits, bts_root=a.bts_root and os.path.expanduser(a.bts_root),
                              bts_split=a.bts_split and os.path.expanduser(a.bts_split), copy=a.copy)
    for k, v in summary.items():
        print(f"{k}: {v}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .results.report import write_report

    out = write_report(a.results_dir, published_dir=a.published_dir)
    for p in (out if isinstance(out, (list, tuple)) else [out]):
        print(f"wrote {p}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(a.out, a.images, a.device)


def cmd_sensitivity(a: argparse.Namespace) -> int:
    from .evaluators.base import RunConfig
    from .sensitivity import run_sensitivity

    cfg = RunConfig(task=a.task, backbone=a.backbone, method=a.method, dataset=a.dataset,
                    data_root=os.path.expanduser(a.data_root), method_params=_parse_params(a.param), split=a.split,
                    protocol=a.protocol, weights=a.weights, random_init=a.random_init, allow_download=a.download,
                    device=a.device, batch_size=a.batch_size, num_workers=a.workers, limit=a.limit,
                    results_dir=a.results_dir, cache_dir=a.cache_dir, force=a.force, progress=not a.no_progress)
    res = run_sensitivity(cfg, a.out, _split(a.knobs), all_protocols=not a.no_other_protocols)
    for row in res["rows"]:
        v = row.variant
        print(f"{v.protocol_id:<40} mIoU {row.record.metrics['mIoU']:.2f}" + (f"  FLAG: {'; '.join(row.flags)}"
                                                                            if row.flags else ""))
    print(f"table: {res['md']} ({res['csv']})\nplot:  {res['png']}")
    return 0


def cmd_viz(a: argparse.Namespace) -> int:
    """``harness viz``: build the methods on one backbone (as ``harness run`` does), draw, write the page."""
    from .errors import ConfigError
    from .evaluators.base import options_per_method
    from .image_folder import list_images
    from .models import attach_method, build_dense_model, parse_method_weights
    from .runtime import select_device
    from .viz.features import DEFAULT_RESOLUTION
    from .viz.render import VizSettings, write_viz

    methods = _split(a.method)
    if not methods:
        raise ConfigError("--method: give at least one method (harness list methods)")
    resolution = a.resolution or DEFAULT_RESOLUTION
    if resolution < 1:
        raise ConfigError(f"--resolution {a.resolution}: expected a positive number of pixels")
    paths = list_images(a.images, a.limit)
    device = select_device(a.device)
    opts = options_per_method(methods, _parse_params(a.param), parse_method_weights(a.method_weights))
    base = build_dense_model(a.backbone, methods[0], opts[0][0], a.weights, opts[0][1], a.random_init,
                             a.download).to(device)
    models = [base] + [attach_method(base.backbone, m, p, w).to(device) for m, (p, w) in zip(methods[1:], opts[1:])]
    settings = VizSettings(projection="umap" if a.umap else "pca", resolution=resolution, names=a.names,
                           query=a.query, cache_dir=a.cache_dir, show_progress=not a.no_progress,
                           title=f"harness viz: {a.backbone}")
    res = write_viz(models, paths, a.images, a.out, device, settings)
    print(f"wrote {len(res.figures)} figure(s) and {res.index}")
    return 0


def cmd_ttr(a: argparse.Namespace) -> int:
    """``harness ttr find-neurons``: search, write the neuron file, print the ranking."""
    import json

    import torch

    from .image_folder import list_images, load_image
    from .methods.ttr_search import find_register_neurons, settings_for
    from .models import build_dense_model
    from .runtime import progress, select_device

    settings = settings_for(a.backbone, a.detect_layer, a.norm_threshold, a.layer_limit, a.top_k)
    device = select_device(a.device)
    model = build_dense_model(a.backbone, "vanilla", weights=a.weights, random_init=a.random_init,
                              allow_download=a.download).to(device)
    paths = list_images(a.images, a.num_images)
    spec = model.spec
    bs = max(1, a.batch_size)

    def batches():  # type: ignore[no-untyped-def]
        for i in progress(range(0, len(paths), bs), desc=f"ttr find-neurons {a.backbone}"):
            yield torch.stack([load_image(p, a.resolution, spec.mean, spec.std) for p in paths[i:i + bs]]).to(device)

    result = find_register_neurons(model, batches(), settings)
    out = {"backbone": spec.id, "weights": model.backbone.weights_id, **result.to_json(),
           "resolution": a.resolution, "images_folder": os.path.abspath(a.images),
           "source": "harness ttr find-neurons (Jiang et al., Vision Transformers Don't Need Trained Registers, "
                     "NeurIPS 2025, arXiv:2506.08010)"}
    from .io_safety import atomic_write_text

    atomic_write_text(a.out, json.dumps(out, indent=1), "neuron file")
    print(f"{result.images_with_outliers}/{result.images} images with tokens of norm > {settings.norm_threshold:g} "
          f"after block {model.backbone.block_index(settings.detect_layer)} ({result.outlier_tokens} tokens; "
          f"largest norm {result.max_norm:.1f})")
    for rank, ((layer, unit), score) in enumerate(zip(result.neurons, result.scores), 1):
        print(f"  {rank:>3}. layer {layer:>2} unit {unit:>5}  mean |act| on outliers {score:.3f}")
    print(f"wrote {a.out}  (use: --method ttr --method-weights {a.out})")
    return 0


def cmd_distill(a: argparse.Namespace) -> int:
    import importlib

    from .io_safety import ensure_writable_dir

    ensure_writable_dir(os.path.dirname(os.path.abspath(a.out)), "output folder", "--out")  # before training

    return int(importlib.import_module(DISTILLERS[a.cleaner]).run(a))


COMMANDS = {"run": cmd_run, "ttr": cmd_ttr, "distill": cmd_distill, "suite": cmd_suite, "list": cmd_list,
            "data": cmd_data, "report": cmd_report, "demo": cmd_demo, "viz": cmd_viz,
            "sensitivity": cmd_sensitivity}


def _terminate_like_ctrl_c(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal API
    """SIGTERM (a scheduler's kill, ``timeout``) takes the Ctrl-C path: partial state is saved, then exit 143."""
    from . import interrupts

    interrupts.note(signum)
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = _LOADED_AT if argv is None else time.perf_counter()  # argv None: this process is the command
    args = build_parser().parse_args(argv)
    args.started = started
    if not getattr(args, "download", False):  # no network must never mean a stalled run (README "Weights")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import signal
    import threading

    from . import interrupts

    interrupts.reset()
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _terminate_like_ctrl_c)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: finished records are kept; re-run the same command to resume", file=sys.stderr)
        return interrupts.exit_status()  # 130 for Ctrl-C, 143 for SIGTERM (shell convention)
    except Exception as e:  # user-facing errors: one message, no traceback unless --debug
        from .errors import HarnessError
        from .registry import RegistryError

        if args.debug:
            raise
        if isinstance(e, (HarnessError, RegistryError)):
            print(f"harness: error: {e}", file=sys.stderr)
            return 2
        print(f"harness: unexpected {type(e).__name__}: {e}\n(run again with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
