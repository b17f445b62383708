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


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_suite_file_is_runnable(path):
    with open(path) as f:
        suite = yaml.safe_load(f)
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
