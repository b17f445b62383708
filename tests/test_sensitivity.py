"""``harness sensitivity``: its rows are the records ``harness run`` writes, its grid is the documented one,
and settings known to be wrong are flagged.

Fast tests use the planted tiny CLIP (random init) on two generated VOC images with a one-template test
protocol; the ViT-B/16 run of the acceptance check is marked slow.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from harness.cli import main
from harness.errors import ConfigError
from harness.results.record import load_records
from harness.synthetic.segmentation import write_demo_voc

PROTOCOL = {
    "id": "test-sens", "version": 1, "task": "ovss", "description": "tiny CPU protocol for sensitivity tests",
    "source": "tests", "defaults": {"mode": "slide", "crop": 64, "stride": 32, "max_long_side": 2048,
                                    "resize": 72, "logit_scale": 40, "prob_thd": 0.0, "area_thd": None,
                                    "pamr": None, "name_set": "sclip", "templates": "test_one"},
    "datasets": {"voc21": {"prob_thd": 0.1}, "voc20": {}},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from harness.text import templates

    tmp = tmp_path_factory.mktemp("sens")
    old = templates.TEMPLATE_SETS.get("test_one")
    templates.TEMPLATE_SETS["test_one"] = ["a photo of a {}."]
    proto = tmp / "proto.yaml"
    proto.write_text(yaml.safe_dump(PROTOCOL))
    root = write_demo_voc(str(tmp / "data"), num_images=2, size=(64, 80))
    yield {"proto": str(proto), "root": root, "tmp": tmp}
    if old is None:
        templates.TEMPLATE_SETS.pop("test_one", None)
    else:
        templates.TEMPLATE_SETS["test_one"] = old


def _common(s, results: str) -> list:
    return ["--backbone", "test-planted-clip", "--random-init", "--method", "naclip", "--data-root", s["root"],
            "--results-dir", results, "--cache-dir", str(s["tmp"] / "cache"), "--device", "cpu", "--workers", "0",
            "--no-progress"]


def sensitivity(s, results: str, out: str, dataset: str, knobs: str) -> int:
    return main(["sensitivity", "--dataset", dataset, "--protocol", s["proto"], "--knobs", knobs,
                 "--no-other-protocols", "--out", out, *_common(s, results)])


def _rows(out: str) -> list:
    with open(os.path.join(out, "sensitivity.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_rows_are_the_records_of_separate_runs_and_a_second_call_resumes(setup) -> None:
    s = setup
    res, out = str(s["tmp"] / "res"), str(s["tmp"] / "out")
    assert sensitivity(s, res, out, "voc21", "prob_thd,name_set") == 0
    rows = _rows(out)
    # the reference, then prob_thd 0 and 0.2 around 0.1 (0.1 left out), then the other name set
    assert [(r["protocol"], r["knob"], r["value"]) for r in rows] == [
        ("test-sens", "(protocol)", ""), ("test-sens~prob_thd=0", "prob_thd", "0"),
        ("test-sens~prob_thd=0.2", "prob_thd", "0.2"), ("test-sens~name_set=clearclip", "name_set", "clearclip")]
    records = {r.protocol: r for r in load_records(res)}
    assert set(records) == {r["protocol"] for r in rows}
    ref = records["test-sens"].metrics["mIoU"]
    for r in rows:
        rec = records[r["protocol"]]
        assert float(r["mIoU"]) == pytest.approx(rec.metrics["mIoU"], abs=1e-4)
        assert float(r["delta_mIoU"]) == pytest.approx(rec.metrics["mIoU"] - ref, abs=2e-4)
    assert records["test-sens~prob_thd=0.2"].settings["prob_thd"] == 0.2
    assert records["test-sens~name_set=clearclip"].settings["name_set"] == "clearclip"
    assert Path(out, "sensitivity.md").read_text().count("| test-sens") == 4
    assert Path(out, "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # one variant run on its own through `harness run ovss --protocol <variant yaml>` gives the same numbers
    variant = os.path.join(out, "protocols", "test-sens~prob_thd=0.2.yaml")
    alone = str(s["tmp"] / "alone")
    assert main(["run", "ovss", "--dataset", "voc21", "--protocol", variant, *_common(s, alone)]) == 0
    (rec_alone,) = load_records(alone)
    mine = records["test-sens~prob_thd=0.2"]
    assert rec_alone.protocol == "test-sens~prob_thd=0.2"
    assert rec_alone.metrics == mine.metrics
    assert rec_alone.per_class == mine.per_class

    # a second invocation reads the records back: none is rewritten
    stamps = {p: os.path.getmtime(p) for p in Path(res).rglob("*.json")}
    assert sensitivity(s, res, out, "voc21", "prob_thd,name_set") == 0
    assert {p: os.path.getmtime(p) for p in Path(res).rglob("*.json")} == stamps
    assert _rows(out) == rows


def test_a_threshold_on_a_dataset_without_background_is_flagged(setup) -> None:
    s = setup
    res, out = str(s["tmp"] / "res20"), str(s["tmp"] / "out20")
    assert sensitivity(s, res, out, "voc20", "prob_thd") == 0
    flags = {r["protocol"]: r["flag"] for r in _rows(out)}
    assert set(flags) == {"test-sens", "test-sens~prob_thd=0.1", "test-sens~prob_thd=0.2"}
    assert flags["test-sens"] == ""  # VOC20 with no threshold: nothing wrong
    for p in ("test-sens~prob_thd=0.1", "test-sens~prob_thd=0.2"):
        assert "no background class" in flags[p] and "'aeroplane'" in flags[p]
    assert "⚠ prob_thd 0.2 on voc20" in Path(out, "sensitivity.md").read_text()


def test_wrong_settings_against_the_datasets_class_lists() -> None:
    from harness.registry import DATASETS
    from harness.sensitivity import has_background, wrong_settings

    # label 0 is `background` (and scored) exactly on VOC21, Context-60 and COCO-Object
    assert {n for n in ("voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff164k", "ade20k",
                        "cityscapes") if has_background(DATASETS.get(n))} == {"voc21", "context60", "coco_object"}
    stuff = DATASETS.get("coco_stuff164k")
    assert wrong_settings({"prob_thd": 0.0, "area_thd": None}, stuff) == []
    (msg,) = wrong_settings({"prob_thd": 0.1, "area_thd": None}, stuff)
    assert "coco_stuff164k" in msg and "'person'" in msg and "SCLIP issue #2" in msg
    assert len(wrong_settings({"prob_thd": 0.1, "area_thd": 0.1}, stuff)) == 2
    assert wrong_settings({"prob_thd": 0.1, "area_thd": 0.1}, DATASETS.get("voc21")) == []
    # a spec whose class 0 is named background but ignored (reduce_zero_label) has no background to fall to
    fake = SimpleNamespace(class_names=["background", "cat"], reduce_zero_label=True, name="fake")
    assert not has_background(fake) and wrong_settings({"prob_thd": 0.1}, fake)


def test_knob_grid_around_phreg_voc21() -> None:
    from harness.protocols import get_protocol
    from harness.sensitivity import NACLIP_PAMR, knob_values

    st = get_protocol("ovss", "phreg").settings("voc21")  # resize 448, crop 336, stride 112, scale 40, thd 0.1
    assert knob_values("resize", st, "voc21") == [336, 560]
    assert knob_values("crop", st, "voc21") == [224, 448]
    assert knob_values("stride", st, "voc21") == [224]
    assert knob_values("logit_scale", st, "voc21") == [50.0, 100.0]
    assert knob_values("prob_thd", st, "voc21") == [0.0, 0.2]
    assert knob_values("pamr", st, "voc21") == [NACLIP_PAMR]
    assert knob_values("name_set", st, "voc21") == ["clearclip"]
    # stride <= crop is kept: with crop 224 and stride 224 no smaller crop exists, no larger stride either
    small = {**st, "crop": 224, "stride": 224}
    assert knob_values("crop", small, "voc21") == [336, 448]
    assert knob_values("stride", small, "voc21") == [112]
    with pytest.raises(ConfigError, match="--knobs 'mode'"):
        knob_values("mode", st, "voc21")


def test_variant_files_are_schema_checked_protocols(tmp_path: Path) -> None:
    from harness.protocols import get_protocol, load_protocol_file
    from harness.sensitivity import NACLIP_PAMR, write_variant

    phreg = get_protocol("ovss", "phreg")
    path = write_variant(phreg, "voc21", "pamr", dict(NACLIP_PAMR), str(tmp_path))
    assert os.path.basename(path) == "phreg~pamr=10x8-16.yaml"
    p = load_protocol_file(path)
    assert (p.id, p.version, p.task, list(p.datasets)) == ("phreg~pamr=10x8-16", phreg.version, "ovss", ["voc21"])
    want = {**phreg.settings("voc21"), "pamr": NACLIP_PAMR}
    assert p.settings("voc21") == want
    with pytest.raises(ConfigError, match="stride 112 exceeds crop 64"):
        write_variant(phreg, "voc21", "crop", 64, str(tmp_path))


def test_bad_options_give_one_clear_error(setup, capsys: pytest.CaptureFixture) -> None:
    s = setup
    out = str(s["tmp"] / "bad")
    assert sensitivity(s, str(s["tmp"] / "r"), out, "voc21", "prob_thd,colour") == 2
    assert "--knobs colour" in capsys.readouterr().err
    assert sensitivity(s, str(s["tmp"] / "r"), out, "ade20k", "prob_thd") == 2
    assert "has no entry for dataset 'ade20k'" in capsys.readouterr().err
    assert main(["sensitivity", "--task", "depth", "--dataset", "nyu", "--out", out, *_common(s, out)]) == 2
    assert "--task 'depth'" in capsys.readouterr().err


@pytest.mark.slow
def test_vit_b16_on_the_demo_data_writes_table_and_plot(tmp_path: Path) -> None:
    """The acceptance run: random ViT-B/16, every registered OVSS protocol and every knob."""
    root = write_demo_voc(str(tmp_path / "data"), num_images=1, size=(320, 320))
    out = str(tmp_path / "out")
    assert main(["sensitivity", "--backbone", "clip-b16-openai", "--random-init", "--method", "naclip",
                 "--dataset", "voc21", "--data-root", root, "--out", out, "--results-dir", str(tmp_path / "res"),
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    rows = _rows(out)
    from harness.protocols import list_protocols

    assert {r["protocol"] for r in rows if r["knob"] == "(protocol)"} == {p.id for p in list_protocols("ovss")}
    assert {r["knob"] for r in rows} >= {"resize", "crop", "stride", "logit_scale", "prob_thd", "pamr", "name_set"}
    assert len(load_records(str(tmp_path / "res"))) == len(rows)
    assert Path(out, "sensitivity.png").stat().st_size > 0
    json.dumps(rows)
