"""Fixtures of the dataset tests: a load pipeline and a helper that builds a registered dataset."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest

#: the two loading steps of every OVSS test pipeline (SCLIP-lineage configs/cfg_*.py), nothing else
LOAD_PIPELINE: List[Dict[str, Any]] = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")]


@pytest.fixture
def load_pipeline() -> List[Dict[str, Any]]:
    return [dict(t) for t in LOAD_PIPELINE]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dataset code must never touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
