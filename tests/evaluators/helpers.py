"""Shared by the probe evaluator tests: shipped protocols scaled down to CPU size."""
from __future__ import annotations

import os

import yaml

PROTOCOLS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "harness", "protocols")


def scaled_protocol(path, task: str, base: str, new_id: str, **overrides) -> str:
    """The shipped protocol ``<task>/<base>`` with a new id and smaller numbers, written to ``path``."""
    with open(os.path.join(PROTOCOLS_DIR, task, f"{base}.yaml")) as f:
        data = yaml.safe_load(f)
    data["id"] = new_id
    data.pop("default", None)
    data["defaults"].update(overrides)
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)
