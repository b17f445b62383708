"""The training loop: identical results after a hard kill or a Ctrl-C and a resume; curves CSV and PNG."""
from __future__ import annotations

import csv
import os
import signal

import pytest
import torch

from harness.probes.curves import Curves
from harness.probes.heads import HeadBank, LinearSegHead
from harness.probes.schedules import Schedule
from harness.probes.trainer import ProbeTrainer, SimulatedKill

ITERS = 12
DATA = torch.Generator().manual_seed(0)
FEATS = torch.randn(ITERS, 4, 8, 3, 3, generator=DATA)
LABELS = torch.randint(0, 5, (ITERS, 4, 3, 3), generator=DATA)


def make(tmp_path, name: str, kill_after=None) -> ProbeTrainer:
    torch.manual_seed(0)
    heads = HeadBank([LinearSegHead(8, 5), LinearSegHead(8, 5)])
    sched = Schedule({"policy": "poly", "warmup_iters": 3, "warmup_ratio": 1e-3}, ITERS)
    return ProbeTrainer(heads, ["a", "b"], [1e-2, 3e-2], 1e-4, (0.9, 0.999), 1.0, sched, ITERS,
                        str(tmp_path / f"{name}.ckpt.pt"), "fp", checkpoint_interval=4, log_interval=2,
                        progress=False, kill_after=kill_after)


def batches(start: int):
    for it in range(start, ITERS):
        yield FEATS[it], LABELS[it]


def loss_fn(trainer: ProbeTrainer):
    def f(b, it, j):
        x, y = b
        return torch.nn.functional.cross_entropy(trainer.heads.heads[j](x), y)
    return f


def eval_fn(trainer: ProbeTrainer):
    def f(it):
        with torch.no_grad():
            return {n: {"score": float(h(FEATS[0]).mean())} for n, h in zip(trainer.head_names, trainer.heads.heads)}
    return f


def run(trainer: ProbeTrainer) -> None:
    trainer.fit(batches, loss_fn(trainer), eval_fn(trainer), eval_interval=5)


def assert_same(a: ProbeTrainer, b: ProbeTrainer) -> None:
    for (k, x), (_, y) in zip(a.heads.state_dict().items(), b.heads.state_dict().items()):
        assert torch.equal(x, y), k
    assert a.curves.rows == b.curves.rows


def test_hard_kill_then_resume_equals_an_uninterrupted_run(tmp_path) -> None:
    ref = make(tmp_path, "ref")
    run(ref)
    killed = make(tmp_path, "k", kill_after=7)
    with pytest.raises(SimulatedKill):
        run(killed)  # dies after 7 iterations; the last checkpoint is at 4
    resumed = make(tmp_path, "k")
    run(resumed)
    assert resumed.resumed_from == 4
    assert_same(ref, resumed)


def test_ctrl_c_saves_and_resumes_exactly(tmp_path, monkeypatch) -> None:
    ref = make(tmp_path, "ref")
    run(ref)
    t = make(tmp_path, "c")
    original = ProbeTrainer._set_hyper

    def hook(self, it):
        if it == 6 and not getattr(self, "_sent", False):
            self._sent = True
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C in the middle of iteration 6
        original(self, it)

    monkeypatch.setattr(ProbeTrainer, "_set_hyper", hook)
    with pytest.raises(KeyboardInterrupt):
        run(t)
    monkeypatch.setattr(ProbeTrainer, "_set_hyper", original)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    resumed = make(tmp_path, "c")
    run(resumed)
    assert resumed.resumed_from == 7  # iteration 6 finished, then the checkpoint
    assert_same(ref, resumed)


def test_a_checkpoint_of_another_configuration_is_not_resumed(tmp_path) -> None:
    killed = make(tmp_path, "x", kill_after=5)
    with pytest.raises(SimulatedKill):
        run(killed)
    other = make(tmp_path, "x")
    other.fingerprint = "another"
    run(other)
    assert other.resumed_from is None


def test_per_head_backward_equals_one_backward_of_the_sum(tmp_path) -> None:
    t = make(tmp_path, "seq")
    run(t)
    torch.manual_seed(0)
    heads = HeadBank([LinearSegHead(8, 5), LinearSegHead(8, 5)])
    opt = torch.optim.AdamW([{"params": list(h.parameters()), "lr": lr} for h, lr in zip(heads.heads, [1e-2, 3e-2])],
                            betas=(0.9, 0.999), weight_decay=1e-4)
    sched = Schedule({"policy": "poly", "warmup_iters": 3, "warmup_ratio": 1e-3}, ITERS)
    heads.train()
    for it in range(ITERS):
        for g, base in zip(opt.param_groups, [1e-2, 3e-2]):
            g["lr"] = sched.lr(base, it)
        opt.zero_grad()
        torch.stack([torch.nn.functional.cross_entropy(o, LABELS[it]) for o in heads(FEATS[it])]).sum().backward()
        for h in heads.heads:
            torch.nn.utils.clip_grad_norm_(h.parameters(), 1.0)
        opt.step()
    for (k, x), (_, y) in zip(t.heads.state_dict().items(), heads.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=k)


def test_curves_csv_and_png(tmp_path) -> None:
    t = make(tmp_path, "curves")
    run(t)
    csv_path = t.curves.write_csv(str(tmp_path / "r.curves.csv"))
    png_path = t.curves.plot(str(tmp_path / "r.curves.png"), "toy")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert {r["kind"] for r in rows} == {"train", "val"}
    assert {r["name"] for r in rows} == {"loss", "lr", "score"}
    assert sorted({int(r["iter"]) for r in rows if r["name"] == "loss"}) == list(range(2, ITERS + 1, 2))
    assert sorted({int(r["iter"]) for r in rows if r["kind"] == "val"}) == [5, 10, 12]
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert Curves(t.curves.state()).rows == t.curves.rows
