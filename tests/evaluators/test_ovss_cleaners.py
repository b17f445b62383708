"""`harness run ovss` with cleaners that add tokens, hook layers, wrap the forward and carry weights.

On the planted-artifact backbone: one pass of ``naclip,ttr+naclip,naclip+tta`` gives the records that
separate runs give; method weights are part of every identity (record, text cache) and a change of the
file's bytes makes a new one.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest

from harness.backbones.planted import PLANTED_LAYER, PLANTED_UNIT
from harness.cli import main
from harness.results.record import load_records
from harness.synthetic.segmentation import write_synthetic_dataset

from .test_ovss_e2e import TEST_PROTOCOL

PROTOCOL = {**TEST_PROTOCOL, "id": "test-cleaners", "defaults": {**TEST_PROTOCOL["defaults"], "crop": 48,
                                                                  "stride": 32, "resize": 64}}


@pytest.fixture()
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import yaml

    from harness.text import templates

    monkeypatch.setitem(templates.TEMPLATE_SETS, "test_one", ["a photo of a {}."])
    proto = tmp_path / "proto.yaml"
    proto.write_text(yaml.safe_dump(PROTOCOL))
    root = write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=3, size=(64, 96))
    neurons = tmp_path / "neurons.json"
    neurons.write_text(json.dumps({"backbone": "test-planted-clip", "neurons": [[PLANTED_LAYER, PLANTED_UNIT]]}))
    return {"proto": str(proto), "root": root, "neurons": str(neurons), "tmp": tmp_path}


def run(s, results: str, method: str, *extra: str) -> int:
    return main(["run", "ovss", "--backbone", "test-planted-clip", "--random-init", "--dataset", "voc21",
                 "--data-root", s["root"], "--protocol", s["proto"], "--results-dir", results,
                 "--cache-dir", str(s["tmp"] / "cache"), "--device", "cpu", "--workers", "0", "--no-progress",
                 "--method", method, *extra])


def test_one_pass_equals_separate_runs(setup) -> None:
    s = setup
    both = str(s["tmp"] / "pass")
    assert run(s, both, "naclip,ttr+naclip,naclip+tta", "--method-weights", s["neurons"], "--param", "views=3") == 0
    in_pass = {r.method: r for r in load_records(both)}
    assert set(in_pass) == {"naclip", "ttr+naclip", "naclip+tta"}
    assert in_pass["ttr+naclip"].method_weights and not in_pass["naclip"].method_weights
    assert in_pass["naclip+tta"].method_params["tta"]["views"] == 3
    assert in_pass["naclip"].settings["methods_in_pass"] == ["naclip", "ttr+naclip", "naclip+tta"]
    for method, extra in (("naclip", []), ("ttr+naclip", ["--method-weights", s["neurons"]]),
                          ("naclip+tta", ["--param", "views=3"])):
        alone = str(s["tmp"] / f"alone-{method}")
        assert run(s, alone, method, *extra) == 0
        (rec,) = load_records(alone)
        assert rec.metrics == in_pass[method].metrics, method
        assert rec.per_class == in_pass[method].per_class, method
        assert rec.method_weights == in_pass[method].method_weights
        assert os.path.basename(glob.glob(os.path.join(alone, "runs", "*", "*", "*.json"))[0]) == \
            os.path.basename(glob.glob(os.path.join(both, "runs", "*", "*", f"*__{method}__*.json"))[0])


def _name_caches(text_cache) -> list:
    """The per-name-list text cache files (the per-prompt store lives in its own ``prompts/`` folder)."""
    return [f for f in os.listdir(text_cache) if f.endswith(".pt")]


def test_method_weights_are_part_of_the_identity(setup) -> None:
    s = setup
    results = str(s["tmp"] / "results")
    other = s["tmp"] / "other.json"
    other.write_text(json.dumps({"backbone": "test-planted-clip", "neurons": [[PLANTED_LAYER, PLANTED_UNIT],
                                                                             [2, 5]]}))
    text_cache = s["tmp"] / "cache" / "text"
    assert run(s, results, "ttr", "--method-weights", s["neurons"]) == 0
    assert run(s, results, "ttr", "--method-weights", str(other)) == 0
    recs = load_records(results)
    assert len(recs) == 2 and len({r.method_weights["ttr"] for r in recs}) == 2
    assert len(_name_caches(text_cache)) == 2
    # a finished run is found again ...
    assert run(s, results, "ttr", "--method-weights", s["neurons"]) == 0
    assert len(load_records(results)) == 2 and len(_name_caches(text_cache)) == 2
    # ... but not once the file's bytes change (same neurons, other bytes)
    Path(s["neurons"]).write_text(json.dumps({"backbone": "test-planted-clip",
                                              "neurons": [[PLANTED_LAYER, PLANTED_UNIT]]}, indent=2))
    assert run(s, results, "ttr", "--method-weights", s["neurons"]) == 0
    assert len(load_records(results)) == 3 and len(_name_caches(text_cache)) == 3


def test_feature_cache_keys_include_method_weights(setup) -> None:
    from harness.evaluators.base import RunConfig
    from harness.evaluators.probe_base import start_probe_run
    from harness.probes.cache import cache_dir_name

    s = setup
    other = s["tmp"] / "other.json"
    other.write_text(json.dumps({"backbone": "test-planted-clip", "neurons": [[2, 5]]}))
    names = []
    for path in (s["neurons"], str(other)):
        cfg = RunConfig(task="linear-seg", backbone="test-planted-clip", method="ttr", dataset="voc21",
                        data_root=s["root"], method_weights=path, random_init=True, device="cpu",
                        results_dir=str(s["tmp"] / "r"), protocol="fast")
        run_ = start_probe_run(cfg, "linear-seg", "val")
        names.append(cache_dir_name(run_.cache_fields("train", "view", [], {})))
        assert run_.cache_fields("train", "view", [], {})["method_weights"] == run_.model.method_weights
    assert names[0] != names[1]


@pytest.mark.parametrize("extra,match", [
    (["--method", "ttr+nacl1p"], "Did you mean: naclip"),
    (["--method", "naclip+sclip"], "parts 'naclip' and 'sclip' both replace the last block"),
    (["--method", "ttr", "--method-weights", "{trunc}"], "not a test-time-register neuron file"),
    (["--method", "ttr", "--method-weights", "{foreign}"], "neurons were found on backbone 'clip-b16-openai'"),
    (["--method", "ttr", "--method-weights", "{range}"], "layer 40 is out of range"),
    (["--method", "naclip,ttr+naclip", "--method-weights", "nosuch={trunc}"], "--method-weights nosuch="),
    (["--method", "naclip,tta", "--method-weights", "{range}"], "no method of naclip, tta takes it"),
])
def test_bad_method_input_is_one_line_exit_2(setup, capsys, extra, match) -> None:
    s = setup
    files = {"trunc": s["tmp"] / "trunc.json", "foreign": s["tmp"] / "foreign.json", "range": s["tmp"] / "r.json"}
    files["trunc"].write_text('{"backbone": "test-planted-clip", "neur')
    files["foreign"].write_text(json.dumps({"backbone": "clip-b16-openai", "neurons": [[1, 2]]}))
    files["range"].write_text(json.dumps({"backbone": "test-planted-clip", "neurons": [[40, 2]]}))
    extra = [e.format(**{k: str(v) for k, v in files.items()}) for e in extra]
    rc = run(s, str(s["tmp"] / "res"), extra[1], *extra[2:])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("harness: error:") and match in lines[0], err
    if "--method-weights" in extra and "=" not in extra[-1]:
        assert extra[-1] in lines[0]  # the message names the file


def test_pass_options_go_to_the_methods_that_take_them() -> None:
    from harness.errors import ConfigError
    from harness.evaluators.base import options_per_method

    opts = options_per_method(["naclip", "naclip+tta", "ttr"], {"tta.views": 2, "sigma": 3.0}, "n.json")
    assert opts == [({"sigma": 3.0}, None), ({"tta.views": 2, "sigma": 3.0}, None), ({}, "n.json")]
    with pytest.raises(ConfigError, match="views: no method of naclip, sclip takes it"):
        options_per_method(["naclip", "sclip"], {"views": 2}, None)
    with pytest.raises(ConfigError, match="--method-weights n.json: no method of naclip, tta takes it"):
        options_per_method(["naclip", "tta"], {}, "n.json")
