"""`harness suite`: a YAML matrix expands into the same runs as the equivalent `harness run` calls."""
from __future__ import annotations

import yaml

from harness.cli import main
from harness.results.record import load_records


def test_suite_runs_every_combination(tmp_path, monkeypatch):
    from harness.synthetic.segmentation import write_synthetic_dataset
    from harness.text import templates

    monkeypatch.setitem(templates.TEMPLATE_SETS, "test_one", ["a photo of a {}."])
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    proto = {"id": "tiny", "version": 1, "task": "ovss", "description": "t", "source": "tests",
             "defaults": {"mode": "whole", "crop": 64, "stride": 32, "max_long_side": 2048, "resize": 64,
                          "logit_scale": 40, "prob_thd": 0.0, "area_thd": None, "pamr": None, "name_set": "sclip",
                          "templates": "test_one"},
             "datasets": {"voc21": {}, "voc20": {}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    root = write_synthetic_dataset("voc21", str(data / "voc"), num_images=2, size=(60, 80))
    rel = root[len(str(data)) + 1:]  # voc20 reads the same VOC2012 root
    suite = {"task": "ovss", "protocol": str(tmp_path / "p.yaml"), "backbones": ["clip-b16-openai"],
             "methods": ["maskclip", "naclip"], "datasets": {"voc21": rel, "voc20": rel}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    assert main(["suite", str(tmp_path / "s.yaml"), "--data-dir", str(data), "--random-init", "--workers", "0",
                 "--results-dir", str(tmp_path / "res"), "--no-progress"]) == 0
    got = sorted((r.method, r.dataset) for r in load_records(str(tmp_path / "res")))
    assert got == [("maskclip", "voc20"), ("maskclip", "voc21"), ("naclip", "voc20"), ("naclip", "voc21")]


def test_suite_rejects_unknown_keys(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"task": "ovss", "backbones": [], "methods": [], "datasets": {},
                                                      "backbone": "x"}))
    assert main(["suite", str(tmp_path / "s.yaml"), "--data-dir", str(tmp_path)]) == 2
    assert "unknown key(s) backbone" in capsys.readouterr().err


def test_suite_passes_method_weights_per_backbone(tmp_path, monkeypatch):
    """``method_weights: {backbone: {part: file}}`` (files relative to --weights-dir) reach the runs."""
    import json

    from harness.backbones.planted import PLANTED_LAYER, PLANTED_UNIT
    from harness.synthetic.segmentation import write_synthetic_dataset
    from harness.text import templates

    monkeypatch.setitem(templates.TEMPLATE_SETS, "test_one", ["a photo of a {}."])
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    data, wdir = tmp_path / "data", tmp_path / "weights"
    wdir.mkdir()
    (wdir / "n.json").write_text(json.dumps({"backbone": "test-planted-clip",
                                             "neurons": [[PLANTED_LAYER, PLANTED_UNIT]]}))
    proto = {"id": "tiny", "version": 1, "task": "ovss", "description": "t", "source": "tests",
             "defaults": {"mode": "whole", "crop": 64, "stride": 32, "max_long_side": 2048, "resize": 64,
                          "logit_scale": 40, "prob_thd": 0.0, "area_thd": None, "pamr": None, "name_set": "sclip",
                          "templates": "test_one"}, "datasets": {"voc21": {}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    root = write_synthetic_dataset("voc21", str(data / "voc"), num_images=2, size=(60, 80))
    suite = {"task": "ovss", "protocol": str(tmp_path / "p.yaml"), "backbones": ["test-planted-clip"],
             "methods": ["naclip", "ttr+naclip"], "datasets": {"voc21": root[len(str(data)) + 1:]},
             "method_weights": {"test-planted-clip": {"ttr": "n.json"}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    assert main(["suite", str(tmp_path / "s.yaml"), "--data-dir", str(data), "--weights-dir", str(wdir),
                 "--random-init", "--workers", "0", "--results-dir", str(tmp_path / "res"), "--no-progress"]) == 0
    recs = {r.method: r for r in load_records(str(tmp_path / "res"))}
    assert set(recs) == {"naclip", "ttr+naclip"}
    assert recs["ttr+naclip"].method_weights and not recs["naclip"].method_weights
