"""Protocols: versioned YAML data that fixes every number-changing knob of a task.

Each file ``harness/protocols/<task>/<id>.yaml`` holds ``id``, ``version``, ``task``, ``description``,
``source`` (where each constant comes from), ``defaults`` and ``datasets: {name: {...overrides}}``.
Bump ``version`` on any change that can move a number; results record id and version
(``tests/protocols/test_protocol_pins.py`` pins a content hash per id and version).

Every file is checked against its task's typed schema when it is loaded (:mod:`.schema`, one
``schema_<task>.py`` per task): unknown, missing and mistyped keys are one :class:`ConfigError`
naming the file and the key.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

import yaml

from ..errors import ConfigError
from ..registry import Registry
from .schema import check_protocol

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRED = ("id", "version", "task", "description", "source", "defaults", "datasets")


@dataclass(frozen=True)
class Protocol:
    id: str
    version: int
    task: str
    description: str
    source: str
    defaults: Dict[str, Any]
    datasets: Dict[str, Dict[str, Any]]
    path: str = ""
    default_for_task: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)
    #: per dataset: defaults overlaid with its entry, checked against the task's schema
    resolved: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.id}"

    def settings(self, dataset: str) -> Dict[str, Any]:
        """The resolved settings for ``dataset``: defaults overlaid with the dataset's entry."""
        if dataset not in self.datasets:
            raise ConfigError(
                f"protocol {self.key} v{self.version} has no entry for dataset {dataset!r}; "
                f"it covers: {', '.join(sorted(self.datasets))} ({self.path})"
            )
        if dataset in self.resolved:
            return copy.deepcopy(self.resolved[dataset])
        out = copy.deepcopy(self.defaults)
        out.update(copy.deepcopy(self.datasets[dataset] or {}))
        return out


def content_sha256(path: str) -> str:
    """sha256 of a protocol file's canonical content: the parsed YAML as sorted-key JSON.

    Comments, key order and layout do not count; any value that changes does (the pin test compares this
    with ``tests/protocols/protocol_pins.json`` per task, id and version).
    """
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read protocol file {path}: {e}") from e
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def load_protocol_file(path: str) -> Protocol:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read protocol file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"protocol file {path} must hold a mapping with keys {', '.join(REQUIRED)}")
    top, resolved = check_protocol(data, path)
    extra = {k: v for k, v in top.items() if k not in REQUIRED and k != "default"}
    return Protocol(id=top["id"], version=top["version"], task=top["task"],
                    description=top["description"].strip(), source=top["source"].strip(),
                    defaults=dict(top["defaults"]), datasets={k: dict(v or {}) for k, v in top["datasets"].items()},
                    path=path, default_for_task=top["default"], extra=extra, resolved=resolved)


class _ProtocolRegistry(Registry):
    """Entries are the YAML files below this package, keyed ``<task>/<id>``."""

    def __init__(self) -> None:
        super().__init__("protocol")
        self._discovered = False

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for task in sorted(os.listdir(HERE)):
            tdir = os.path.join(HERE, task)
            if not os.path.isdir(tdir) or task.startswith("_"):
                continue
            for fn in sorted(os.listdir(tdir)):
                if fn.endswith((".yaml", ".yml")):
                    p = load_protocol_file(os.path.join(tdir, fn))
                    self.add(p.key, p)


PROTOCOLS: Registry = _ProtocolRegistry()


def get_protocol(task: str, name: str | None = None) -> Protocol:
    """Protocol ``name`` of ``task`` (or the task's default when ``name`` is None), or a YAML path."""
    if name and os.path.isfile(name):
        return load_protocol_file(name)
    if name is None:
        defaults = [p for _, p in PROTOCOLS.items() if p.task == task and p.default_for_task]
        if len(defaults) != 1:
            raise ConfigError(f"task {task!r} has {len(defaults)} default protocols; pass --protocol")
        return defaults[0]
    return PROTOCOLS.get(f"{task}/{name}")


def list_protocols(task: str | None = None) -> List[Protocol]:
    return [p for _, p in PROTOCOLS.items() if task is None or p.task == task]
