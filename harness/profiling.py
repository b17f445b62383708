"""Where a run's wall time goes: named stages timed with ``time.perf_counter`` (``harness run --profile``).

A disabled :class:`StageTimer` costs one attribute test per stage, so the evaluators always call it. On a
GPU, a stage's end waits for queued kernels (``sync``) so that time is charged to the stage that launched
the work, not to the next one that happens to wait for it.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

#: the label of wall time covered by no named stage (printed, never hidden)
UNACCOUNTED = "unaccounted"


class StageTimer:
    """Accumulates seconds per stage name; stages may repeat (per batch), never nest into each other."""

    def __init__(self, enabled: bool = True, sync: Optional[Callable[[], None]] = None) -> None:
        self.enabled = enabled
        self.sync = sync
        self.seconds: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}
        self.started = time.perf_counter()
        self._active: Optional[str] = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Charge the time spent inside the block to ``name`` (a nested stage is charged to the outer one)."""
        if not self.enabled or self._active is not None:
            yield
            return
        self._active = name
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.add(name, time.perf_counter() - t)
            self._active = None

    def add(self, name: str, seconds: float) -> None:
        if not self.enabled:
            return
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)
        self.calls[name] = self.calls.get(name, 0) + 1

    def wall(self) -> float:
        """Seconds since the timer was created (the run's wall time when created at its start)."""
        return time.perf_counter() - self.started

    def rows(self, wall: Optional[float] = None) -> List[Tuple[str, float]]:
        """(stage, seconds) in first-seen order, then the unaccounted remainder of ``wall``."""
        wall = self.wall() if wall is None else wall
        rows = list(self.seconds.items())
        rows.append((UNACCOUNTED, max(0.0, wall - sum(self.seconds.values()))))
        return rows

    def as_dict(self, wall: Optional[float] = None) -> Dict[str, object]:
        """JSON-ready breakdown stored in run records (``settings.profile``)."""
        wall = self.wall() if wall is None else wall
        return {"wall_s": round(wall, 4), "stages_s": {k: round(v, 4) for k, v in self.seconds.items()},
                "calls": dict(self.calls), "unaccounted_s": round(max(0.0, wall - sum(self.seconds.values())), 4)}

    def format(self, title: str = "profile", wall: Optional[float] = None) -> str:
        """A small table: stage, seconds, share of the wall time, calls."""
        wall = self.wall() if wall is None else wall
        lines = [f"{title}: wall {wall:.2f} s", f"  {'stage':<22}{'s':>9}{'%':>7}{'calls':>7}"]
        for name, sec in self.rows(wall):
            share = 100.0 * sec / wall if wall > 0 else 0.0
            lines.append(f"  {name:<22}{sec:>9.3f}{share:>7.1f}{self.calls.get(name, 0):>7}")
        lines.append(f"  {'sum of stages':<22}{sum(self.seconds.values()):>9.3f}")
        return "\n".join(lines)


#: the shared disabled timer (no state is ever written to it)
OFF = StageTimer(enabled=False)
