"""Which signal interrupted the run, so ``harness`` exits with the shell's code for it (130 Ctrl-C, 143 SIGTERM).

Why a module of its own: the signal is caught in different layers (the CLI, the probe trainer, the distillation
loop each install a handler that saves state first), and the exit status is decided at the top.
"""
from __future__ import annotations

import signal

_last = 0


def note(signum: int) -> None:
    """Remember the signal a handler received."""
    global _last
    _last = int(signum)


def reset() -> None:
    note(0)


def exit_status() -> int:
    """128 + the signal number (SIGINT when none was noted: a plain KeyboardInterrupt)."""
    return 128 + (_last or int(signal.SIGINT))
