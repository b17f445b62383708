"""The probe training loop: AdamW over one or more heads, mmcv schedules, checkpoints, resume, progress.

Why it resumes exactly: the batch of iteration *i* is a function of (seed, i) (see ``data.py``), the
learning rate and beta1 are functions of *i* (``schedules.py``), and the checkpoint holds the heads,
the optimiser state, the partial loss averages and the curve history. A run interrupted after any
iteration and restarted from its last checkpoint therefore ends with the same heads, on CPU bit for bit.

Interruption: Ctrl-C (SIGINT) or SIGTERM sets a flag; the loop finishes the current iteration, writes a
checkpoint and raises ``KeyboardInterrupt``. A hard kill loses at most ``checkpoint_interval`` iterations.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from .. import interrupts
from ..errors import WeightsError
from ..io_safety import atomic_torch_save
from ..runtime import Dist
from .curves import Curves
from .heads import HeadBank
from .schedules import Schedule


class SimulatedKill(BaseException):
    """Test hook: abandons the run without saving, like SIGKILL (raised after ``kill_after`` iterations)."""


EvalFn = Callable[[int], Dict[str, Dict[str, float]]]


class ProbeTrainer:
    """Train ``heads`` (one per learning rate) for ``max_iters`` iterations with checkpoint/resume.

    Args:
        heads: the heads, trained independently (one AdamW parameter group each).
        head_names: labels for curves, e.g. ``lr=1e-3``.
        lrs: base learning rate of each head.
        weight_decay, betas: AdamW settings (betas[0] may follow a one-cycle schedule).
        grad_clip: max L2 norm per head, or None.
        schedule: learning-rate / momentum schedule.
        max_iters: total iterations.
        checkpoint_path: where the resumable state lives (removed by the caller when the run is done).
        fingerprint: identifies the run configuration; a checkpoint with another fingerprint is ignored.
        checkpoint_interval, log_interval: in iterations.
        progress: show a tqdm bar with loss and ETA.
        kill_after: test hook, see :class:`SimulatedKill`.
        dist: the torchrun job (each rank feeds its slice of the global batch; gradients and logged losses
            are averaged over the ranks, as DDP does; only rank 0 writes checkpoints and shows progress).
    """

    def __init__(self, heads: HeadBank, head_names: Sequence[str], lrs: Sequence[float], weight_decay: float,
                 betas: Sequence[float], grad_clip: Optional[float], schedule: Schedule, max_iters: int,
                 checkpoint_path: str, fingerprint: str, checkpoint_interval: int, log_interval: int,
                 progress: bool = True, desc: str = "probe", kill_after: Optional[int] = None,
                 dist: Optional[Dist] = None) -> None:
        if len(head_names) != len(heads) or len(lrs) != len(heads):
            raise ValueError("one name and one learning rate per head")
        self.heads = heads
        self.head_names = list(head_names)
        self.lrs = [float(x) for x in lrs]
        self.betas = (float(betas[0]), float(betas[1]))
        self.grad_clip = grad_clip
        self.schedule = schedule
        self.max_iters = int(max_iters)
        self.checkpoint_path = checkpoint_path
        self.fingerprint = fingerprint
        self.checkpoint_interval = max(1, int(checkpoint_interval))
        self.log_interval = max(1, int(log_interval))
        self.progress = progress
        self.desc = desc
        self.kill_after = kill_after
        self.dist = dist or Dist()
        self.optimizer = torch.optim.AdamW(
            [{"params": list(h.parameters()), "lr": lr} for h, lr in zip(heads.heads, self.lrs)],
            lr=self.lrs[0], betas=self.betas, weight_decay=float(weight_decay))
        self.curves = Curves()
        self.iteration = 0
        self.resumed_from: Optional[int] = None
        self._loss_sum = [0.0] * len(heads)
        self._loss_n = 0
        self._stop = False
        self.train_seconds = 0.0

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"fingerprint": self.fingerprint, "iteration": self.iteration, "heads": self.heads.state_dict(),
                "optimizer": self.optimizer.state_dict(), "curves": self.curves.state(),
                "loss_sum": list(self._loss_sum), "loss_n": self._loss_n}

    def save(self) -> None:
        """Atomically (a kill, a full disk or a second writer never leaves a torn checkpoint); rank 0 only."""
        if not self.dist.is_main:
            return
        atomic_torch_save(self.state_dict(), self.checkpoint_path, "probe checkpoint")

    def resume(self) -> int:
        """Load the checkpoint if it belongs to this run; returns the iteration to start from.

        Read with ``torch.load(weights_only=True)`` (tensors and plain containers only). A file that is not a
        checkpoint of this trainer (truncated, foreign) is a :class:`WeightsError` naming it, not a silent restart.
        """
        if not os.path.isfile(self.checkpoint_path):
            return 0
        fix = "delete it to restart this run from iteration 0"
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as e:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise WeightsError(f"probe checkpoint {self.checkpoint_path} is unreadable ({reason}); expected a "
                               f"checkpoint written by this trainer: {fix}") from e
        if not isinstance(state, dict) or not {"fingerprint", "iteration", "heads", "optimizer"} <= set(state):
            raise WeightsError(f"probe checkpoint {self.checkpoint_path} is not a harness probe checkpoint (expected "
                               f"fingerprint, iteration, heads, optimizer entries): {fix}")
        if state.get("fingerprint") != self.fingerprint:
            return 0
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.curves = Curves(state["curves"])
        self._loss_sum = list(state["loss_sum"])
        self._loss_n = int(state["loss_n"])
        self.iteration = int(state["iteration"])
        self.resumed_from = self.iteration
        return self.iteration

    # -- loop ----------------------------------------------------------------------------------
    def _set_hyper(self, it: int) -> None:
        for group, base in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = self.schedule.lr(base, it)
            group["betas"] = (self.schedule.beta1(it, self.betas[0]), self.betas[1])

    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal API
        interrupts.note(signum)
        self._stop = True

    def fit(self, batches: Callable[[int], Iterable[Any]],
            loss_fn: Optional[Callable[[Any, int, int], torch.Tensor]],
            eval_fn: Optional[EvalFn] = None, eval_interval: int = 0,
            prepare: Optional[Callable[[Any], Any]] = None,
            losses_fn: Optional[Callable[[Any, int], Sequence[torch.Tensor]]] = None) -> None:
        """Run from the last checkpoint to ``max_iters``.

        Args:
            batches: ``batches(start)`` yields the batches of iterations ``start..max_iters-1`` in order.
            loss_fn: ``loss_fn(inputs, it, j)`` returns head j's scalar loss. Heads are backpropagated one
                after the other, so only one head's activations (e.g. logits upsampled to 512x512 for 150
                classes) are alive at a time; the result equals one backward of the summed losses.
            eval_fn: ``eval_fn(it)`` returns {head name: {metric: value}} (heads are in eval mode).
            eval_interval: evaluate every this many iterations and at the end (0 = only at the end).
            prepare: ``prepare(batch)`` -> the inputs shared by all heads (e.g. frozen backbone features),
                computed once per iteration; default: the batch itself.
            losses_fn: instead of ``loss_fn``: ``losses_fn(inputs, it)`` returns every head's loss from one
                shared computation (e.g. the whole grid as one matrix product); their sum is backpropagated
                once. The heads share no parameters, so each still gets exactly its own gradient.
        """
        from tqdm.auto import tqdm

        if (loss_fn is None) == (losses_fn is None):
            raise ValueError("pass exactly one of loss_fn and losses_fn")
        start = self.resume()
        if start >= self.max_iters:
            return
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: no handler, Ctrl-C stays a plain KeyboardInterrupt
                pass
        bar = tqdm(total=self.max_iters, initial=start, desc=self.desc,
                   disable=not (self.progress and self.dist.is_main), dynamic_ncols=True, leave=False)
        t0 = time.time()
        self.heads.train()
        try:
            for batch in batches(start):
                it = self.iteration
                self._set_hyper(it)
                inputs = prepare(batch) if prepare is not None else batch
                self.optimizer.zero_grad(set_to_none=True)
                losses = []
                if losses_fn is not None:
                    joint = list(losses_fn(inputs, it))
                    if len(joint) != len(self.heads):
                        raise ValueError(f"losses_fn returned {len(joint)} losses for {len(self.heads)} heads")
                    torch.stack(joint).sum().backward()
                    losses = [loss.detach() for loss in joint]
                else:
                    for j in range(len(self.heads)):  # heads are independent: each gets its own gradient
                        loss = loss_fn(inputs, it, j)
                        loss.backward()
                        losses.append(loss.detach())
                if self.dist.world_size > 1:  # DDP: the mean gradient of the ranks' losses
                    self.dist.average_gradients(self.heads.parameters())
                    losses = [torch.tensor(v) for v in self.dist.mean([float(x) for x in losses])]
                if self.grad_clip:
                    for h in self.heads.heads:
                        nn.utils.clip_grad_norm_(h.parameters(), float(self.grad_clip), norm_type=2.0)
                self.optimizer.step()
                for j, loss in enumerate(losses):
                    self._loss_sum[j] += float(loss)
                self._loss_n += 1
                self.iteration = it = it + 1
                if it % self.log_interval == 0 or it == self.max_iters:
                    for j, name in enumerate(self.head_names):
                        self.curves.add(it, "train", name, "loss", self._loss_sum[j] / self._loss_n)
                        self.curves.add(it, "train", name, "lr", self.optimizer.param_groups[j]["lr"])
                    self._loss_sum, self._loss_n = [0.0] * len(self.heads), 0
                if eval_fn is not None and ((eval_interval and it % eval_interval == 0) or it == self.max_iters):
                    self.heads.eval()
                    for name, metrics in eval_fn(it).items():
                        for k, v in metrics.items():
                            self.curves.add(it, "val", name, k, v)
                    self.heads.train()
                if it % self.checkpoint_interval == 0 and it < self.max_iters:
                    self.save()
                bar.update(1)
                bar.set_postfix(loss=f"{min(float(x) for x in losses):.4f}", refresh=False)
                if self.kill_after is not None and it >= self.kill_after:
                    raise SimulatedKill(f"simulated kill after {it} iterations")
                if self._stop:
                    self.save()  # between iterations the state is consistent
                    raise KeyboardInterrupt
                if it >= self.max_iters:
                    break
        except KeyboardInterrupt:
            # ours (saved above) or one that hit mid-iteration without our handler (not saved: the state may
            # be half-updated, the last periodic checkpoint stays the resume point)
            raise
        except Exception:
            if self._stop:  # e.g. a DataLoader worker killed by the same Ctrl-C
                self.save()
                raise KeyboardInterrupt from None
            raise
        finally:
            bar.close()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.heads.eval()
        self.train_seconds = time.time() - t0
