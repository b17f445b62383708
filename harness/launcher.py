"""Run a suite's cells as ``submitit`` jobs: one Slurm job per cell (``slurm``) or one local process each (``local``).

Why submitit: it pickles a Python call, submits it (``sbatch`` job array on Slurm, ``subprocess`` locally), and
gives back each job's state, logs and exception, so a suite on a cluster is the same code path as a suite on a
laptop (the local executor is what the tests use). A cell is one ``harness run`` argument list; its record lands
in the shared results folder, and ``harness report`` gathers them like any other records.

This module knows nothing of the command line: the caller passes the entry point (``harness.cli.main``), which
submitit pickles by reference and imports again inside the job.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from .errors import ConfigError

#: the ``--launcher`` values that go through submitit (``inline`` runs the cells in this process, one after another)
LAUNCHERS = ("local", "slurm")

Entry = Callable[[Sequence[str]], int]


@dataclass(frozen=True)
class Cell:
    """One run of a suite: a readable name (``backbone/method/dataset``) and its ``harness`` argument list."""

    name: str
    argv: List[str]


@dataclass(frozen=True)
class JobSettings:
    """What each job asks the scheduler for (``--partition``, ``--gpus``, ``--time``, ``--cpus``, ``--mem``)."""

    folder: str
    partition: Optional[str] = None
    gpus: int = 0
    time_min: int = 240
    cpus: int = 8
    mem_gb: Optional[int] = None
    max_parallel: int = 0


class CellJob:
    """The callable submitit runs inside a job: join the job's process group if it has several tasks
    (``--gpus`` > 1 starts one task per GPU, as torchrun would), then run the cell; a non-zero exit fails the job."""

    def __init__(self, entry: Entry, cell: Cell) -> None:
        self.entry = entry
        self.cell = cell

    def __call__(self) -> str:
        import submitit

        try:
            env = submitit.JobEnvironment()
            many = env.num_tasks > 1
        except RuntimeError:  # not inside a submitit job (called directly)
            many = False
        if many:  # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT for harness.runtime.init_distributed
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        rc = self.entry(self.cell.argv)
        if rc != 0:
            raise RuntimeError(f"cell {self.cell.name}: harness {self.cell.argv[0]} exited with {rc} "
                               "(the job's log has its message)")
        return self.cell.name


def make_executor(kind: str, settings: JobSettings):
    """A submitit executor for ``kind`` (local or slurm) with the job settings applied."""
    if kind not in LAUNCHERS:
        raise ConfigError(f"--launcher {kind!r} is not one of inline, {', '.join(LAUNCHERS)}")
    try:
        import submitit
    except ImportError as e:
        raise ConfigError(f"--launcher {kind} needs the submitit package (pip install submitit)") from e
    if settings.time_min < 1:
        raise ConfigError(f"--time must be a positive number of minutes, got {settings.time_min}")
    if settings.gpus < 0:
        raise ConfigError(f"--gpus must be 0 or more, got {settings.gpus}")
    if kind == "slurm" and not settings.partition:
        raise ConfigError("--launcher slurm needs --partition (the Slurm partition the jobs go to)")
    try:
        executor = submitit.AutoExecutor(folder=os.path.join(settings.folder, "%j"), cluster=kind)
    except RuntimeError as e:  # e.g. sbatch not found
        raise ConfigError(f"--launcher {kind}: submitit cannot use this cluster ({e})") from e
    tasks = max(1, settings.gpus)
    params = dict(name="harness", timeout_min=settings.time_min, gpus_per_node=settings.gpus, tasks_per_node=tasks,
                  nodes=1, cpus_per_task=max(1, settings.cpus // tasks))
    if settings.mem_gb:
        params["mem_gb"] = settings.mem_gb
    if kind == "slurm":
        params["slurm_partition"] = settings.partition
        if settings.max_parallel:
            params["slurm_array_parallelism"] = settings.max_parallel
    executor.update_parameters(**params)
    return executor


def submit_cells(entry: Entry, cells: Sequence[Cell], kind: str, settings: JobSettings) -> list:
    """Submit one job per cell (a Slurm job array on ``slurm``); returns the submitit jobs in cell order."""
    executor = make_executor(kind, settings)
    with executor.batch():  # the jobs are submitted together when the block ends
        jobs = [executor.submit(CellJob(entry, cell)) for cell in cells]
    return jobs


def wait_for(jobs: Sequence, cells: Sequence[Cell]) -> List[str]:
    """Wait for every job; returns one line per failed cell (empty when all finished)."""
    failed = []
    for job, cell in zip(jobs, cells):
        try:
            job.result()
        except Exception as e:  # submitit re-raises the job's exception (or a FailedJobError) here
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            raised = [x for x in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt): ", x)]
            reason = (raised or lines or [type(e).__name__])[-1]  # the job's own exception line, when there is one
            said = _harness_message(str(job.paths.stderr))
            failed.append(f"{cell.name} (job {job.job_id}, log {job.paths.stderr}): {reason[:300]}"
                          + (f"\n  {said[:500]}" if said else ""))
    return failed


def _harness_message(log: str) -> str:
    """The cell's own one-line error (``harness: error: ...``) from the job's stderr log, or ''."""
    try:
        with open(log, errors="replace") as f:
            lines = [x.strip() for x in f if x.startswith("harness: ")]
    except OSError:
        return ""
    return lines[-1] if lines else ""
