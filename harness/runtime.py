"""Device selection, torch.distributed (torchrun) set-up and progress bars shared by evaluators."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence

import torch

#: default windows (OVSS) or views (artifacts) per backbone batch on a CPU: larger batches were slower on the
#: 2-core development machine (benchmarks/RESULTS.md: batch 8 0.29 img/s, batch 2 0.36 img/s, batch 1 0.35 img/s)
CPU_BATCH = 2
#: the same on a GPU: a harness choice that keeps a ViT-B/16 batch of 336-px windows far below any current GPU's
#: memory (not yet timed on one: benchmarks/gpu_check.sh measures it when a GPU is lent)
GPU_BATCH = 32


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def per_rank(self, global_batch: int, what: str = "batch_size") -> int:
        """This rank's share of a protocol's global batch: the numbers do not depend on the number of ranks,
        so a global batch the ranks cannot split evenly is refused."""
        if global_batch % self.world_size:
            from .errors import ConfigError

            whose = "" if what.startswith("--") else "the protocol's "  # a command-line option names itself
            raise ConfigError(f"{whose}{what} {global_batch} does not split over {self.world_size} torchrun "
                              f"processes; use a number of processes that divides it")
        return global_batch // self.world_size

    def shard_batch(self, items: Sequence[Any], what: str = "batch_size") -> List[Any]:
        """This rank's consecutive slice of one global batch (rank r gets slots r*b .. (r+1)*b-1)."""
        b = self.per_rank(len(items), what)
        return list(items[self.rank * b:(self.rank + 1) * b])

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks (what DDP does after backward), one flat all-reduce."""
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        k = 0
        for g in grads:
            g.copy_(flat[k:k + g.numel()].view_as(g))
            k += g.numel()

    def mean(self, values: Sequence[float]) -> List[float]:
        """The mean of each value over the ranks (e.g. per-rank losses, for curves that match one process)."""
        return [v / self.world_size for v in self.total(values)]

    def total(self, values: Sequence[float]) -> List[float]:
        """The sum of each value over the ranks, in float64 (counts and metric sums of sharded evaluations)."""
        if self.world_size <= 1:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` in rank order, on every rank (a list of one in a single process)."""
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shard(self, items: Sequence[Any]) -> List[Any]:
        """This rank's share of a list of evaluation items: every ``world_size``-th from position ``rank``
        (the split OVSS uses; unlike :meth:`shard_batch` any length is fine)."""
        return list(items[self.rank::self.world_size])

    def differentiable_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, with a backward that sums the ranks' gradients (a loss over the global
        batch computed from per-rank sums); ``t`` itself in a single process."""
        if self.world_size <= 1:
            return t
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(t)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world_size=world, local_rank=local)


def select_device(name: str = "auto", dist: Optional[Dist] = None) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank if dist else 0)
        return torch.device("cpu")
    return torch.device(name)


@dataclass(frozen=True)
class DevicePolicy:
    """Every choice of the evaluation loops that depends on the kind of device, in one place.

    Why one object: the CUDA path (large window batches, page-locked loader memory, asynchronous host-to-device
    copies, the profiler waiting for queued kernels) must run, and be tested, on machines without a GPU. A test
    forces ``device_policy(torch.device("cpu"), kind="cuda")`` and checks that its record equals the CPU one's.
    """

    kind: str  # "cuda" or "cpu": whose rules these are (may differ from ``device.type`` in tests)
    device: torch.device
    batch_size: int  # default windows / views per backbone batch (``--batch-size`` overrides it)
    pin_memory: bool  # the DataLoader returns page-locked host tensors, so copies can overlap compute
    non_blocking: bool  # host-to-device copies are queued, not waited for

    @property
    def autocast_device_type(self) -> str:
        """``torch.autocast`` acts on the device the tensors live on, whatever rules the policy follows."""
        return self.device.type

    @property
    def profiler_sync(self) -> Optional[Callable[[], None]]:
        """What ``--profile`` calls at the end of each stage: on CUDA, wait for the stage's queued kernels."""
        return self.synchronize if self.kind == "cuda" else None

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def device_policy(device: torch.device, kind: Optional[str] = None) -> DevicePolicy:
    """The rules for ``device`` (``kind`` forces another device type's rules, for tests of the CUDA path on a CPU).

    CUDA: batches of :data:`GPU_BATCH`, pinned loader memory, ``non_blocking`` copies. Pinning needs the CUDA
    driver (page-locked memory is allocated through it), so without one the loader stays unpinned; every other
    CUDA choice still applies. Anything else (CPU, MPS, ...): :data:`CPU_BATCH`, plain memory, blocking copies.
    """
    device = torch.device(device)
    kind = kind or ("cuda" if device.type == "cuda" else "cpu")
    if kind == "cuda":
        return DevicePolicy("cuda", device, GPU_BATCH, pin_memory=torch.cuda.is_available(), non_blocking=True)
    if kind == "cpu":
        return DevicePolicy("cpu", device, CPU_BATCH, pin_memory=False, non_blocking=False)
    from .errors import ConfigError

    raise ConfigError(f"device policy {kind!r} is not one of cuda, cpu")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index or 0} {torch.cuda.get_device_name(device)}"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def progress(iterable: Optional[Iterable[Any]] = None, total: Optional[int] = None, desc: str = "",
             enabled: bool = True, unit: str = "img"):
    """A tqdm bar (images/s and ETA) on stderr; silent when disabled or not on rank 0."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def precision_context(precision: str, device: torch.device) -> Any:
    """The protocol's ``precision``: ``fp32`` runs as is (the reference), ``bf16`` under
    ``torch.autocast(dtype=torch.bfloat16)`` on the device's type, CPU included."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device_policy(device).autocast_device_type, dtype=torch.bfloat16)
    from .errors import ConfigError

    raise ConfigError(f"precision {precision!r} is not one of fp32, bf16 (the protocol's `precision` key)")
