"""SIGTERM and SIGINT mid-run: the run saves its partial state, exits non-zero, and the same command resumes to
the record an uninterrupted run writes. The signal is a real one, sent by the process to itself from inside the
work loop (so it lands mid-run at a known point): it goes through the handlers ``harness.cli.main`` installs.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from harness.evaluators import ovss as ovss_mod
from harness.probes.trainer import ProbeTrainer

from .helpers import linear_protocol, one_error, ovss_args, records, run_cli, voc, write_protocol


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_ovss_interrupted_mid_pass_resumes_to_the_same_record(capsys, tmp_path, monkeypatch, sig, code) -> None:
    root, cache, proto = voc(tmp_path / "data", n=9), tmp_path / "cache", write_protocol(tmp_path)
    rc, _, err = run_cli(capsys, ovss_args(root, tmp_path / "ref", cache, proto))
    assert rc == 0, err
    (ref_path,) = records(tmp_path / "ref")
    ref = json.loads(Path(ref_path).read_text())

    real = ovss_mod.dense_logits
    calls = []

    def signal_in_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the first batch of 4 images is accumulated; the signal lands in the second
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    monkeypatch.setattr(ovss_mod, "dense_logits", signal_in_second_batch)
    results = tmp_path / "results"
    rc, out, err = run_cli(capsys, ovss_args(root, results, cache, proto))
    assert rc == code and "re-run the same command to resume" in err and "Traceback" not in err
    assert records(results) == []
    (partial,) = list(results.rglob("*.partial-rank0.json"))
    assert json.loads(partial.read_text())["done"] == 4
    assert signal.getsignal(signal.SIGTERM) is not None  # main restored the previous handler

    monkeypatch.setattr(ovss_mod, "dense_logits", real)
    calls.clear()
    rc, _, err = run_cli(capsys, ovss_args(root, results, cache, proto))
    assert rc == 0, err
    (path,) = records(results)
    rec = json.loads(Path(path).read_text())
    assert rec["metrics"] == ref["metrics"] and rec["per_class"] == ref["per_class"] and rec["num_images"] == 9
    assert not partial.exists()


def test_probe_sigterm_mid_training_resumes_to_the_same_record(capsys, tmp_path, monkeypatch) -> None:
    from harness.synthetic.segmentation import write_demo_voc

    root = write_demo_voc(str(tmp_path / "d"), 12, (96, 128), 0, "train")
    write_demo_voc(str(tmp_path / "d"), 4, (96, 128), 0, "val")
    proto = linear_protocol(tmp_path / "p.yaml")

    def args(results: Path):
        return ["run", "linear-seg", "--backbone", "test-vit-tiny", "--random-init", "--dataset", "voc21",
                "--data-root", root, "--protocol", proto, "--results-dir", str(results), "--cache-dir",
                str(tmp_path / "cache"), "--device", "cpu", "--workers", "0", "--no-progress"]

    rc, _, err = run_cli(capsys, args(tmp_path / "ref"))
    assert rc == 0, err
    (ref_path,) = records(tmp_path / "ref")
    ref = json.loads(Path(ref_path).read_text())

    real = ProbeTrainer._set_hyper

    def sigterm_at_iteration_5(self, it):
        if it == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, it)

    monkeypatch.setattr(ProbeTrainer, "_set_hyper", sigterm_at_iteration_5)
    results = tmp_path / "results"
    rc, _, err = run_cli(capsys, args(results))
    assert rc == 143 and "resume" in err and "Traceback" not in err
    assert records(results) == []
    (ckpt,) = list(results.rglob("*.ckpt.pt"))
    monkeypatch.setattr(ProbeTrainer, "_set_hyper", real)
    # the checkpoint truncated (a disk fault outside our atomic write): one line naming it, nothing lost
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 3])
    rc, _, err = run_cli(capsys, args(results))
    line = one_error(rc, err)
    assert str(ckpt) in line and "probe checkpoint" in line and "delete it" in line
    ckpt.write_bytes(good)
    rc, _, err = run_cli(capsys, args(results))
    assert rc == 0, err
    (path,) = records(results)
    rec = json.loads(Path(path).read_text())
    assert rec["settings"]["resumed_from_iter"] == 6  # the iteration the signal arrived in was finished
    assert rec["metrics"] == ref["metrics"] and rec["settings"]["heldout"] == ref["settings"]["heldout"]
