"""The demo's terminal summary: one line per method with its numbers, then the leaderboard and viz paths
(instead of the whole leaderboard markdown)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from harness import demo


def _records():
    return [SimpleNamespace(method=m, metrics={"mIoU": 1.0 + i, "mAcc": 10.0 + i, "aAcc": 20.5})
            for i, m in enumerate(("vanilla", "maskclip", "sclip", "clearclip", "naclip"))]


def test_summary_lines() -> None:
    lines = demo.summary_lines(_records(), "out/results/LEADERBOARD.md", "out/viz/index.html")
    assert lines == [
        "vanilla    mIoU 1.00  mAcc 10.00  aAcc 20.50",
        "maskclip   mIoU 2.00  mAcc 11.00  aAcc 20.50",
        "sclip      mIoU 3.00  mAcc 12.00  aAcc 20.50",
        "clearclip  mIoU 4.00  mAcc 13.00  aAcc 20.50",
        "naclip     mIoU 5.00  mAcc 14.00  aAcc 20.50",
        "leaderboard: out/results/LEADERBOARD.md",
        "viz page:    out/viz/index.html",
    ]


def test_run_demo_prints_the_summary_not_the_leaderboard(tmp_path, monkeypatch, capsys) -> None:
    seen = {}

    def fake_viz(cfg, out):
        seen["viz"] = (cfg.data_root, out)
        return os.path.join(out, "index.html")

    monkeypatch.setattr(demo, "_evaluate", lambda cfg: _records())
    monkeypatch.setattr(demo, "_visualise", fake_viz)
    assert demo.run_demo(str(tmp_path), num_images=1) == 0
    out = capsys.readouterr().out.splitlines()
    md = os.path.join(str(tmp_path), "results", "LEADERBOARD.md")
    assert os.path.isfile(md)
    i = out.index("vanilla    mIoU 1.00  mAcc 10.00  aAcc 20.50")
    assert [line.split()[0] for line in out[i:i + 5]] == ["vanilla", "maskclip", "sclip", "clearclip", "naclip"]
    assert out[i + 5] == f"leaderboard: {md}"
    assert out[i + 6] == f"viz page:    {os.path.join(str(tmp_path), 'viz', 'index.html')}"
    assert not any(line.startswith(("|", "#")) for line in out)  # no leaderboard markdown on the terminal
    assert out[0] == demo.BANNER and out[-1].startswith("demo finished in")
    root = str(tmp_path)
    assert seen["viz"] == (os.path.join(root, "data", "VOCdevkit", "VOC2012"), os.path.join(root, "viz"))


@pytest.mark.slow  # the real demo: minutes on a 2-core CPU
def test_demo_end_to_end(tmp_path, capsys) -> None:
    from html.parser import HTMLParser

    assert demo.run_demo(str(tmp_path), num_images=2) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.split()[0] in ("vanilla", "maskclip", "sclip", "clearclip", "naclip") for line in out
               if line.strip()) == 5
    index = os.path.join(str(tmp_path), "viz", "index.html")

    class Imgs(HTMLParser):
        src: list = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.src.append(dict(attrs)["src"])

    p = Imgs()
    p.feed(open(index, encoding="utf-8").read())
    assert len(p.src) == 2 and all(os.path.isfile(os.path.join(str(tmp_path), "viz", s)) for s in p.src)
