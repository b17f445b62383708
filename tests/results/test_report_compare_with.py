"""Published numbers appear beside ours under the protocols a protocol YAML declares comparable."""
from __future__ import annotations

import os

from harness.results.record import RunRecord, record_path, write_record
from harness.results.report import comparable_protocols, write_report

PUBLISHED = os.path.join(os.path.dirname(__file__), "..", "..", "results", "published")


def test_faithful_probe_protocols_compare_with_dvt_and_phreg():
    assert comparable_protocols("linear-seg", "faithful") == ["faithful", "dvt", "phreg"]
    assert comparable_protocols("depth", "faithful") == ["faithful", "dvt", "phreg"]
    assert comparable_protocols("linear-seg", "fast") == ["fast"]  # fast numbers are never set beside papers
    assert comparable_protocols("ovss", "not-a-protocol") == ["not-a-protocol"]


def test_depth_record_gets_phreg_table2_beside_it(tmp_path):
    rec = RunRecord(task="depth", protocol="faithful", protocol_version=1, backbone="clip-b16-openai",
                    weights="0" * 64, method="maskclip", method_params={}, dataset="nyu", split="test",
                    data_root="/d", num_images=654, metrics={"rmse": 0.7, "abs_rel": 0.2, "delta1": 66.71})
    write_record(rec, record_path(str(tmp_path), "depth", "faithful", rec.backbone, rec.method, "nyu", "k"))
    _, md = write_report(str(tmp_path), published_dir=PUBLISHED)
    text = open(md).read()
    # PH-Reg Table 2, MaskCLIP row: RMSE 0.6645, AbsRel 0.2030, delta1 67.71 -> delta1 difference -1.00
    assert "↳ published: PH-Reg Table 2" in text
    assert "-1.00" in text
