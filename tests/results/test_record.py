"""Run identity: what makes two runs the same record (and the same resumable state)."""
from __future__ import annotations

from harness.results.record import RunRecord, read_record, run_key, write_record

BASE = dict(task="ovss", protocol="phreg", protocol_version=1, backbone="clip-b16-openai", weights="abc",
            method="naclip", method_params={"sigma": 5.0}, dataset="voc21", split="val", limit=None)


def test_run_key_changes_with_everything_that_changes_numbers():
    k = run_key(**BASE)
    assert k == run_key(**BASE)
    for field, value in [("protocol_version", 2), ("weights", "def"), ("method_params", {"sigma": 3.0}),
                         ("split", "train"), ("limit", 10)]:
        assert run_key(**{**BASE, field: value}) != k, field
    # other data folders or seeds never pick up this run's record or partial state
    assert run_key(**BASE, data_root="/data/a") != run_key(**BASE, data_root="/data/b")
    assert run_key(**BASE, seed=1) != run_key(**BASE, seed=2)
    assert run_key(**BASE, seed=0) == k  # the default seed keeps the short form


def test_record_round_trip_is_atomic(tmp_path):
    rec = RunRecord(task="ovss", protocol="phreg", protocol_version=1, backbone="clip-b16-openai",
                    weights="random-init", method="naclip", method_params={"sigma": 5.0}, dataset="voc21",
                    split="val", data_root="/d", num_images=3, metrics={"mIoU": 1.0})
    path = write_record(rec, str(tmp_path / "runs" / "r.json"))
    back = read_record(path)
    assert back == rec and back.random_init
    assert not list((tmp_path / "runs").glob("*.tmp"))
    assert rec.harness_version and rec.git_hash and rec.environment.get("torch")


def test_method_weights_join_the_key_only_when_present():
    k = run_key(**BASE)
    assert run_key(**BASE, method_weights={}) == k  # training-free runs keep their earlier keys
    a = run_key(**BASE, method_weights={"ttr": "aa"})
    assert a != k and a != run_key(**BASE, method_weights={"ttr": "bb"})
