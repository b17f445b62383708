"""The tox `mindeps` env must pin exactly the lower bounds setup.cfg publishes, so a raised (or newly added)
bound that is not also pinned in requirements/mindeps.txt fails here instead of going out untested."""
from __future__ import annotations

import configparser
import os
import re
from typing import Dict, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BOUND = re.compile(r"^([A-Za-z0-9_.\-]+)\s*(>=|==)\s*([0-9][0-9A-Za-z.]*)\s*$")


def _norm(name: str) -> str:
    """PEP 503 name normalisation: open_clip_torch == open-clip-torch."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _version(text: str) -> Tuple[int, ...]:
    """'2.24' -> (2, 24, 0): a bound and its pin compare equal however many trailing zeros they carry."""
    parts = tuple(int(p) for p in text.split("."))
    return parts + (0,) * (3 - len(parts))


def _lower_bounds() -> Dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    out = {}
    for line in cfg["options"]["install_requires"].splitlines():
        m = _BOUND.match(line.split("#")[0].strip())
        if m and m.group(2) == ">=":
            out[_norm(m.group(1))] = m.group(3)
    return out


def _pins() -> Dict[str, str]:
    out = {}
    with open(os.path.join(ROOT, "requirements", "mindeps.txt")) as fh:
        for line in fh:
            m = _BOUND.match(line.split("#")[0].strip())
            if m:
                assert m.group(2) == "==", f"requirements/mindeps.txt: expected exact pins, got {line.strip()!r}"
                out[_norm(m.group(1))] = m.group(3)
    return out


def test_version_helper_pads_trailing_zeros() -> None:
    assert _version("2.24") == _version("2.24.0") == (2, 24, 0)
    assert _version("1.0.3") != _version("1.0")


def test_every_published_lower_bound_is_pinned_in_mindeps() -> None:
    bounds, pins = _lower_bounds(), _pins()
    # the bounds the tox matrix is asked to cover must at least be there (guards against a parser that reads nothing)
    assert {"torch", "open-clip-torch", "timm", "numpy"} <= set(bounds)
    for name, low in bounds.items():
        assert name in pins, f"setup.cfg bounds {name}>={low} but requirements/mindeps.txt does not pin it"
        assert _version(pins[name]) == _version(low), f"{name}: setup.cfg >={low}, mindeps pins =={pins[name]}"


def test_tox_lists_the_matrix_and_mindeps_uses_the_pins() -> None:
    with open(os.path.join(ROOT, "tox.ini")) as fh:
        text = fh.read()
    envlist = re.search(r"^envlist\s*=\s*(.+)$", text, re.M).group(1)
    assert "py{310,311,312}" in envlist and "mindeps" in envlist and "tests" in envlist
    assert "mindeps: PIP_CONSTRAINT = {toxinidir}/requirements/mindeps.txt" in text
