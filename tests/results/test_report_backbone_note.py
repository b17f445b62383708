"""A backbone id's note (``BackboneSpec.note``, e.g. LaSt-ViT's unofficial weights) becomes a leaderboard footnote."""
from __future__ import annotations

from harness.registry import BACKBONES
from harness.results.published import COLUMNS
from harness.results.record import RunRecord, record_path, write_record
from harness.results.report import write_report


def _rec(backbone: str) -> RunRecord:
    return RunRecord(task="linear-seg", protocol="fast", protocol_version=1, backbone=backbone, weights="ab" * 32,
                     method="vanilla", method_params={}, dataset="voc21", split="val", data_root="/d",
                     num_images=1449, metrics={"mIoU": 40.0}, settings={}, created="2026-01-01T00:00:00+00:00",
                     git_hash="cafe", harness_version="0.1.0", environment={})


def test_noted_backbone_gets_a_footnote_and_a_plain_one_none(tmp_path) -> None:
    results = str(tmp_path / "results")
    for i, bid in enumerate(("lastvit-b16-sup", "vit-b16-tv-in1k")):
        r = _rec(bid)
        write_record(r, record_path(results, r.task, r.protocol, r.backbone, r.method, r.dataset, f"k{i}"))
    pub = tmp_path / "published"
    pub.mkdir()
    (pub / "t.csv").write_text(",".join(COLUMNS) + "\novss,x,T,other,clip,clip-b16-openai,voc21,mIoU,1.0,cite,\n")
    _, md = write_report(results, published_dir=str(pub), official_counts={("voc21", "val"): 1449})
    text = open(md).read()
    note = BACKBONES.get("lastvit-b16-sup").note
    assert "not the official" in note
    assert f"- `lastvit-b16-sup`: {note}" in text
    assert "- `vit-b16-tv-in1k`:" not in text
    assert "| vanilla | vit-b16-tv-in1k |" in text
