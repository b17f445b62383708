"""LaSt-ViT at the command line: ``harness list backbones`` shows the ids with their notes, and the
two-document suite configs/lastvit-probes.yaml expands into one run per task and backbone."""
from __future__ import annotations

import os

import pytest

from harness import cli
from harness.cli import main

SUITE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "lastvit-probes.yaml")
PAIRS = {"lastvit-b16-dino": "dino-b16", "lastvit-b16-clip": "clip-b16-openai", "lastvit-b16-sup": "vit-b16-tv-in1k"}


def test_list_backbones_shows_lastvit_ids_and_their_notes(capsys) -> None:
    assert main(["list", "backbones"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    for lastvit, plain in PAIRS.items():
        assert "[note: LaSt-ViT weights (the authors' release), not the official" in lines[lastvit]
        assert plain in lines[lastvit] and "note:" not in lines[plain]


def test_lastvit_suite_runs_both_probes_for_every_pair(monkeypatch, tmp_path) -> None:
    runs = []
    monkeypatch.setattr(cli, "cmd_run", lambda a: runs.append((a.task, a.backbone, a.dataset, a.data_root)))
    assert main(["suite", SUITE, "--data-dir", str(tmp_path), "--random-init"]) == 0
    backbones = [b for pair in PAIRS.items() for b in pair]
    assert sorted((t, b) for t, b, *_ in runs) == sorted((t, b) for t in ("linear-seg", "depth") for b in backbones)
    seg = {(d, r) for t, _, d, r in runs if t == "linear-seg"}
    assert seg == {("voc21,ade20k", f"{tmp_path}/VOCdevkit/VOC2012,{tmp_path}/ADEChallengeData2016")}


def test_a_bad_second_document_stops_before_any_run(monkeypatch, tmp_path, capsys) -> None:
    runs = []
    monkeypatch.setattr(cli, "cmd_run", lambda a: runs.append(a))
    path = tmp_path / "s.yaml"
    path.write_text("task: depth\nbackbones: [dino-b16]\nmethods: [vanilla]\ndatasets: {nyu: nyu}\n---\n"
                    "task: depth\nbackbones: [dino-b16]\nmethods: [vanilla]\n")
    assert main(["suite", str(path), "--data-dir", str(tmp_path)]) == 2
    assert "must define task, backbones, methods, datasets" in capsys.readouterr().err and not runs


@pytest.mark.parametrize("bid", sorted(PAIRS))
def test_lastvit_specs_pool_with_k1_and_plain_ones_keep_cls(bid: str) -> None:
    from harness.registry import BACKBONES

    assert BACKBONES.get(bid).last_k == 1 and BACKBONES.get(PAIRS[bid]).last_k == 0
    assert BACKBONES.get(bid).url.startswith("https://github.com/ChengShiest/LAST-ViT/releases/download/")
