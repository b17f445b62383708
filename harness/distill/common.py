"""What every ``harness distill ...`` trainer shares: seeded image streams, a checkpointed loop that resumes
after a kill, a progress bar with loss and ETA, and the loss curve as CSV and PNG beside the output.

Files written next to ``--out FILE``:

* ``FILE``              the result (written once, atomically, at the end)
* ``FILE.ckpt.pt``      resumable state: trainable tensors, optimiser, scheduler, RNG states, step, curves
                        (written atomically every ``checkpoint_every`` steps and on Ctrl-C / SIGTERM)
* ``FILE.curves.csv``   the loss per logged step (and any extra scalars), tidy
* ``FILE.curves.png``   the same, plotted

Under ``torchrun`` every rank trains on its consecutive slice of each global ``--batch-size`` batch
(:func:`rank_slices`) and the trainable gradients are averaged with one explicit all-reduce after the backward
(``Dist.average_gradients``, as the probe trainer does) rather than through ``DistributedDataParallel``: the
trainers update a few unlocked tensors of frozen models (PH-Reg's student, LoRA, DVT's per-image fields), which
DDP's wrapper would have to hold whole (and whose state-dict names it changes), the step stays the single-process
code, and gloo on CPU works the same. Rank 0 writes checkpoints, curves and outputs; every rank resumes from the
same checkpoint file; logged scalars are the ranks' means.

A checkpoint is resumed only when its fingerprint (everything that changes the numbers: backbone, weights,
images, settings, seed) equals the run's; otherwise training starts over, so a changed command never
continues a different run.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from .. import interrupts
from ..errors import DataError, WeightsError
from ..io_safety import atomic_torch_save
from ..probes.curves import Curves
from ..probes.trainer import SimulatedKill  # the one kill test hook of every trainer (re-exported)
from ..runtime import Dist, progress


def fingerprint(fields: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def files_fingerprint(paths: Sequence[str]) -> str:
    """Paths, sizes and modification times of the training images: a resumed run must see the same data."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _rng_state() -> Dict[str, Any]:
    """RNG states as tensors and plain containers, so a checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()),
             "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                       float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys.numpy(), dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str, what: str = "distillation output") -> str:
    """``torch.save`` to a temporary file, then rename: a kill, a full disk or a second writer never leaves a
    half-written file (:func:`harness.io_safety.atomic_torch_save`)."""
    return atomic_torch_save(obj, path, what)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """A resumable distillation checkpoint, read with ``torch.load(weights_only=True)`` (tensors and plain
    containers only: the RNG states are stored as such); anything else is a :class:`WeightsError` naming it."""
    fix = "delete it to start this distillation over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated by a crash outside our atomic write, another program's file, ...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise WeightsError(f"distillation checkpoint {path} is unreadable ({reason}); expected a checkpoint "
                           f"written by `harness distill`: {fix}") from e
    if not isinstance(state, dict) or not {"fingerprint", "step", "rng", "modules"} <= set(state):
        raise WeightsError(f"distillation checkpoint {path} is not a `harness distill` checkpoint (expected "
                           f"fingerprint, step, rng, modules entries): {fix}")
    return state


@dataclass
class DistillLoop:
    """A checkpointed training loop over ``total_steps`` steps.

    ``modules`` are the objects whose ``state_dict`` is saved and restored (trainable modules, optimiser,
    scheduler); ``step_fn(step)`` runs one optimisation step and returns its scalars (``loss`` first).
    """

    out: str
    total_steps: int
    fingerprint: str
    modules: Dict[str, Any]
    checkpoint_every: int = 100
    log_every: int = 1
    show_progress: bool = True
    desc: str = "distill"
    kill_after: Optional[int] = None  # test hook: stop like SIGKILL after this many steps in this process
    #: the torchrun job: rank 0 writes checkpoints, curves and the result; logged scalars are rank means
    dist: Dist = field(default_factory=Dist)
    curves: Curves = field(default_factory=Curves)
    resumed_from: int = 0
    _stop: bool = False

    @property
    def ckpt_path(self) -> str:
        return self.out + ".ckpt.pt"

    def resume(self) -> int:
        """Restore the latest matching checkpoint; return the first step still to run."""
        if not os.path.isfile(self.ckpt_path):
            return 0
        state = load_checkpoint(self.ckpt_path)
        if state.get("fingerprint") != self.fingerprint:
            return 0
        for name, obj in self.modules.items():
            obj.load_state_dict(state["modules"][name])
        ranks = state.get("rng_ranks")  # torchrun: each rank's own generators (its dropout, its draws)
        same_job = isinstance(ranks, list) and len(ranks) == self.dist.world_size
        _set_rng_state(ranks[self.dist.rank] if same_job else state["rng"])
        self.curves = Curves(state.get("curves", ()))
        self.resumed_from = int(state["step"])
        return self.resumed_from

    def save(self, step: int) -> None:
        """Every rank builds the state (a module may gather its ranks' parts, e.g. DVT stage 1); rank 0 writes.

        Under torchrun every rank's RNG states are gathered too (``rng_ranks``): each rank draws its own LoRA
        dropout, so restoring rank 0's generators on every rank would make a resumed job differ from one that was
        never interrupted. ``rng`` (rank 0's) is what a job with another number of ranks resumes from.
        """
        modules = {k: v.state_dict() for k, v in self.modules.items()}
        rngs = self.dist.gather(_rng_state())
        if not self.dist.is_main:
            return
        atomic_save({"fingerprint": self.fingerprint, "step": step, "rng": rngs[0], "modules": modules,
                     "curves": self.curves.state(), **({"rng_ranks": rngs} if len(rngs) > 1 else {})},
                    self.ckpt_path, "distillation checkpoint")

    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal API
        interrupts.note(signum)
        self._stop = True

    def run(self, step_fn: Callable[[int], Dict[str, float]]) -> None:
        """Run the remaining steps; checkpoint periodically and when interrupted (Ctrl-C, SIGTERM)."""
        start = self.resume()
        old = signal.signal(signal.SIGTERM, self._on_signal) if _main_thread() else None
        bar = progress(total=self.total_steps, desc=self.desc, enabled=self.show_progress and self.dist.is_main)
        bar.update(start)
        done_here = 0
        step = start
        t0 = time.time()
        try:
            for step in range(start, self.total_steps):
                scalars = step_fn(step)
                if self.dist.world_size > 1:  # every rank's scalars describe its slice: log their means
                    scalars = dict(zip(scalars, self.dist.mean(list(scalars.values()))))
                if step % self.log_every == 0 or step == self.total_steps - 1:
                    for name, value in scalars.items():
                        self.curves.add(step + 1, "train", "student", name, float(value))
                done_here += 1
                bar.update(1)
                bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}")
                if (step + 1) % self.checkpoint_every == 0 and step + 1 < self.total_steps:
                    self.save(step + 1)
                if self.kill_after is not None and done_here >= self.kill_after:
                    raise SimulatedKill(f"killed after {done_here} steps (test hook)")
                if self._stop:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            self.save(step + 1 if done_here else start)
            raise
        finally:
            bar.close()
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        self.seconds = time.time() - t0

    def write_curves(self, title: str) -> Dict[str, str]:
        return {"curves_csv": self.curves.write_csv(self.out + ".curves.csv"),
                "curves_png": self.curves.plot(self.out + ".curves.png", title)}

    def finish(self, result: Dict[str, Any], title: str) -> Dict[str, str]:
        """Write the result atomically, the curves beside it, and drop the checkpoint (rank 0; the other ranks
        wait for it, so every rank returns with the files on disk)."""
        if not self.dist.is_main:
            self.dist.barrier()
            return {"curves_csv": self.out + ".curves.csv", "curves_png": self.out + ".curves.png"}
        atomic_save(result, self.out)
        paths = self.write_curves(title)
        if os.path.isfile(self.ckpt_path):
            os.remove(self.ckpt_path)
        self.dist.barrier()
        return paths


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def rank_slices(batches: Iterator[List[Any]], dist: Dist) -> Iterator[List[Any]]:
    """This rank's consecutive slice of each global batch (refused when the ranks cannot split it): with
    per-item seeds from the global position, the ranks together compute what one process computes."""
    for b in batches:
        yield dist.shard_batch(b, "--batch-size")


def cycle_batches(n: int, batch: int, seed: int, start_step: int) -> Iterator[List[int]]:
    """Index batches of a seeded per-epoch permutation, from ``start_step`` on (so a resume sees the same
    batches an uninterrupted run would)."""
    if n < 1:
        raise DataError("no training images")
    per_epoch = max(1, n // batch) if n >= batch else 1
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        if n < batch:
            perm = np.resize(perm, batch)
        yield perm[k * batch:(k + 1) * batch].tolist()
        step += 1
