"""A report written from an install outside the repository (no results/published) still works."""
from __future__ import annotations

import harness.results.published as published
from harness.results.record import RunRecord, record_path, write_record
from harness.results.report import write_report


def test_report_without_published_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(published, "DEFAULT_PUBLISHED_DIR", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    rec = RunRecord(task="ovss", protocol="phreg", protocol_version=1, backbone="clip-b16-openai",
                    weights="random-init", method="naclip", method_params={"sigma": 5.0}, dataset="voc21",
                    split="val", data_root="/d", num_images=3, metrics={"mIoU": 12.5, "mAcc": 20.0, "aAcc": 50.0})
    write_record(rec, record_path(str(tmp_path / "res"), "ovss", "phreg", rec.backbone, rec.method, rec.dataset, "k"))
    assert published.find_published_dir(str(tmp_path / "res")) is None
    csv_path, md_path = write_report(str(tmp_path / "res"))
    text = open(md_path).read()
    assert "12.50" in text and "naclip" in text
    # with the repository's published numbers next to the results they are found again
    (tmp_path / "res" / "published").mkdir()
    assert published.find_published_dir(str(tmp_path / "res")) is None  # empty folder: no CSVs yet
