"""The ``fast`` probe protocols train on the token grid (linear-seg version 2, depth version 4: version 3's loss
on a random window of the grid); faithful linear-seg stays version 1, faithful depth is version 2 (its code
constants moved into the file, same values); versions never share a record, a run key or a checkpoint;
``train_loss`` and ``train_token_window`` are checked with an error naming the file."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from harness.errors import ConfigError
from harness.evaluators.depth import DepthEvaluator
from harness.evaluators.linear_seg import LinearSegEvaluator
from harness.probes.data import window_size
from harness.protocols import get_protocol, load_protocol_file
from harness.results.record import record_path, run_key


@pytest.mark.parametrize("task,dataset,version,faithful_version",
                         [("linear-seg", "voc21", 2, 1), ("depth", "nyu", 4, 2)])
def test_fast_has_the_token_grid_loss_and_faithful_has_none(task, dataset, version, faithful_version) -> None:
    fast = get_protocol(task, "fast")
    assert fast.version == version and fast.settings(dataset)["train_loss"] == "token"
    assert f"Version {version}" in fast.description and "Not faithful" in fast.description
    assert f"version {version}" in fast.source
    faithful = get_protocol(task, "faithful")
    assert faithful.version == faithful_version and "train_loss" not in faithful.settings(dataset)
    # everything but the loss is what version 1 had (iterations, grid of learning rates, batch, selection)
    s = fast.settings(dataset)
    assert (s["max_iters"], s["batch_size"], s["holdout_fraction"], len(s["optimizer"]["lrs"])) == (4000, 16, 0.1, 5)


def test_versions_never_share_a_run_key_or_record_path() -> None:
    common = dict(task="linear-seg", protocol="fast", backbone="dinov2-s14", weights="w", method="vanilla",
                  method_params={}, dataset="voc21", split="val", limit=None, data_root="/d")
    k1, k2 = run_key(protocol_version=1, **common), run_key(protocol_version=2, **common)
    assert k1 != k2
    paths = {record_path("r", "linear-seg", "fast", "dinov2-s14", "vanilla", "voc21", k) for k in (k1, k2)}
    assert len(paths) == 2


def _run(settings, path="p.yaml"):
    return SimpleNamespace(settings=settings, where=f"linear-seg/x v1 ({path})")


def test_train_loss_defaults_to_version_1_and_rejects_unknown_values(tmp_path) -> None:
    # a version-1 file has no train_loss: it keeps meaning the full-resolution loss
    assert LinearSegEvaluator()._train_loss(_run({})) == "pixel"
    assert DepthEvaluator()._train_loss(_run({})) == "pixel"
    assert LinearSegEvaluator()._train_loss(_run({"train_loss": "token"})) == "token"
    assert DepthEvaluator()._train_loss(_run({"train_loss": "head-output"})) == "head-output"
    assert DepthEvaluator()._train_loss(_run({"train_loss": "token"})) == "token"
    with pytest.raises(ConfigError, match=r"p\.yaml\): train_loss 'tokens' must be one of pixel, head-output, token"):
        DepthEvaluator()._train_loss(_run({"train_loss": "tokens"}))
    with pytest.raises(ConfigError, match="must be one of pixel, token"):
        LinearSegEvaluator()._train_loss(_run({"train_loss": "tokens"}))


def test_a_faithful_file_with_a_grid_loss_is_refused(tmp_path) -> None:

    p = tmp_path / "faithful-token.yaml"
    with open(get_protocol("linear-seg", "faithful").path) as f:
        data = yaml.safe_load(f)
    data["id"] = "faithful-token"
    data.pop("default", None)
    data["defaults"]["train_loss"] = "token"
    p.write_text(yaml.safe_dump(data))
    # the protocol schema refuses it when the file is read: train_loss is a key of fast protocols only
    with pytest.raises(ConfigError, match=r"faithful-token\.yaml: defaults\.train_loss: unknown key 'train_loss'"):
        load_protocol_file(str(p))


def test_depth_fast_v4_trains_on_a_window_and_v3_is_the_whole_grid() -> None:
    s = get_protocol("depth", "fast").settings("nyu")
    assert s["train_token_window"] == [0.7, 0.7] and s["train_loss"] == "token"
    assert window_size((30, 39), s["train_token_window"]) == (21, 27)  # a 416x544 view at patch 14: 48% of tokens


@pytest.mark.parametrize("overrides,match", [
    ({"train_token_window": [0.0, 0.7]}, r"depth-window\.yaml.*train_token_window must be two shares in \(0, 1\]"),
    ({"train_token_window": [0.7, 1.5]}, r"train_token_window must be two shares"),
    ({"train_loss": "head-output"}, r"train_token_window \[0\.7, 0\.7\] needs train_loss: token.*'head-output'"),
])
def test_a_bad_depth_token_window_names_the_file_and_the_fix(tmp_path, overrides, match) -> None:
    p = tmp_path / "depth-window.yaml"
    with open(get_protocol("depth", "fast").path) as f:
        data = yaml.safe_load(f)
    data["id"] = "depth-window"
    data.pop("default", None)
    data["defaults"].update(overrides)
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=match):
        load_protocol_file(str(p))
    data["defaults"].update(train_token_window=[1.0, 1.0])  # the whole grid: any train_loss (version 1-3 copies)
    p.write_text(yaml.safe_dump(data))
    assert load_protocol_file(str(p)).settings("nyu")["train_token_window"] == [1.0, 1.0]
