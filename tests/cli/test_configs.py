"""Every shipped suite in configs/ names registered things and a protocol that covers its datasets."""
from __future__ import annotations

import glob
import os

import pytest
import yaml

from harness.models import canonical_method
from harness.protocols import get_protocol
from harness.registry import BACKBONES, DATASETS, EVALUATORS, METHODS

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "*.yaml")))


def _suites(path):
    """The suite documents of a file (several are separated by ``---``)."""
    with open(path) as f:
        return [s for s in yaml.safe_load_all(f) if s is not None]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_suite_file_is_runnable(path):
    suites = _suites(path)
    assert suites
    for suite in suites:
        _check_suite(suite)


def _check_suite(suite):
    assert set(suite) <= {"task", "protocol", "backbones", "methods", "datasets", "method_weights"}
    EVALUATORS.get(suite["task"])
    proto = get_protocol(suite["task"], suite.get("protocol"))
    for b in suite["backbones"]:
        BACKBONES.get(b)
    parts = set()
    for m in suite["methods"]:
        parts.update(canonical_method(m).split("+"))
    for backbone, files in (suite.get("method_weights") or {}).items():
        assert backbone in suite["backbones"], backbone
        assert set(files) <= parts and all(METHODS.get(p).WEIGHTS for p in files), files
    for d in suite["datasets"]:
        proto.settings(DATASETS.canonical(d))


def test_there_are_suites():
    assert len(CONFIGS) >= 3
