"""A dataset lookup imports only dataset specs: no data writer, no preparation code.

Why: ``harness/registry.py`` imports every public module of ``harness/datasets`` on the first lookup, so
anything living there is paid for by every ``DATASETS.get``. The synthetic writers (``harness/synthetic``)
and the preparation code (``harness/prepare``) sit above the specs and must stay out of that path.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: packages above the dataset specs (they may import harness.datasets, never the reverse)
UPPER = ("harness.synthetic", "harness.prepare")


def _is_upper(module: str) -> bool:
    return any(module == u or module.startswith(u + ".") for u in UPPER)

_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from harness.registry import DATASETS
DATASETS.get("voc21")
DATASETS.names()
DATASETS.get("nyu").verify({empty!r}, "test")  # the full NYU check (verify_nyu_split) on an empty root
print(json.dumps(sorted(m for m in sys.modules if m.startswith("harness"))))
"""


def _modules_after_lookup(empty_dir: str) -> List[str]:
    """``harness`` modules loaded by a fresh interpreter after a few registry lookups."""
    code = _CHILD.format(root=ROOT, empty=empty_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_dataset_lookup_imports_no_writer_or_preparation(tmp_path):
    loaded = _modules_after_lookup(str(tmp_path))
    assert "harness.datasets.voc" in loaded and "harness.datasets.nyu" in loaded  # the lookup did run
    upper = [m for m in loaded if _is_upper(m)]
    assert upper == [], f"a dataset lookup imported {upper}"
    # the old homes of the writers and the preparation code are gone for good
    assert not {"harness.datasets.synthetic", "harness.datasets.prepare"} & set(loaded)


def _imported_modules(path: str, package: str) -> List[str]:
    """Absolute names of every module ``path`` imports, at any depth (function-level imports included)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out: List[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]  # ``from .. import synthetic``
    return out


def test_dataset_specs_never_import_upper_layers():
    """Static check, so a lazy import inside a function (invisible to the lookup test) is caught too."""
    pkg_dir = os.path.join(ROOT, "harness", "datasets")
    bad = []
    for name in sorted(os.listdir(pkg_dir)):
        if name.endswith(".py"):
            for mod in _imported_modules(os.path.join(pkg_dir, name), "harness.datasets"):
                if _is_upper(mod):
                    bad.append(f"{name}: {mod}")
    assert bad == []
