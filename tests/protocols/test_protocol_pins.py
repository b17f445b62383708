"""A protocol's content is pinned per (task, id, version): changing a value means a new version.

``protocol_pins.json`` (next to this file) maps ``<task>/<id>@v<version>`` to the sha256 of the file's
canonical content (:func:`harness.protocols.content_sha256`: parsed YAML as sorted-key JSON, so comments
and layout are free to change). Records carry only the id and version, so a changed value under an old
version would silently mix numbers. Old versions stay in the table: their hashes document history.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

import yaml

from harness.protocols import HERE, content_sha256, load_protocol_file

PINS = os.path.join(os.path.dirname(__file__), "protocol_pins.json")


def _pins() -> dict:
    with open(PINS) as f:
        return json.load(f)


def test_every_shipped_protocol_matches_its_pin():
    pins = _pins()
    problems = []
    for path in sorted(glob.glob(os.path.join(HERE, "*", "*.yaml"))):
        p = load_protocol_file(path)
        key = f"{p.task}/{p.id}@v{p.version}"
        digest = content_sha256(path)
        rel = os.path.relpath(path, os.path.dirname(os.path.dirname(HERE)))
        if key not in pins:
            problems.append(f"{rel}: {key} has no pin; add \"{key}\": \"{digest}\" to {PINS}")
        elif pins[key] != digest:
            problems.append(f"{rel}: content changed under {key} (pinned {pins[key][:12]}, now {digest[:12]}): "
                            f"bump version and update the pin (after the bump this test prints the entry to add)")
    assert not problems, "\n".join(problems)


def test_canonical_hash_ignores_comments_and_order_but_not_values(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("# c\nid: x\nversion: 1\ndefaults: {crop: 336, stride: 112}\n")
    b = tmp_path / "b.yaml"
    b.write_text("version: 1   # other comment\nid: x\ndefaults:\n  stride: 112\n  crop: 336\n")
    c = tmp_path / "c.yaml"
    c.write_text("id: x\nversion: 1\ndefaults: {crop: 337, stride: 112}\n")
    assert content_sha256(str(a)) == content_sha256(str(b)) != content_sha256(str(c))
    # independent reference: sha256 of the sorted-key compact JSON of the parsed file
    ref = json.dumps(yaml.safe_load(a.read_text()), sort_keys=True, separators=(",", ":"))
    assert content_sha256(str(a)) == hashlib.sha256(ref.encode()).hexdigest()


def test_pins_table_is_well_formed():
    for key, digest in _pins().items():
        task_id, _, version = key.partition("@v")
        assert "/" in task_id and version.isdigit() and len(digest) == 64, key
