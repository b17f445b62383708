"""Test-suite setup: make the repository importable when pytest is run without installing the package, and give
every test Python's own Ctrl-C handling."""
import os
import signal
import sys
import threading

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(autouse=True)
def _default_sigint_handler():
    """A shell starts background jobs (``cmd &``, ``nohup``) with SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler; the harness rightly keeps it ignored. The interrupt tests send a real SIGINT and
    expect Ctrl-C semantics, so each test starts with Python's default handler, whoever launched pytest."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
