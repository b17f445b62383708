"""Storage faults: a read-only results folder, a full disk while writing a record or a cache, two runs writing
the same results folder and cache at once. Each ends with one line naming the file (exit 2) and no lost or torn
finished result.
"""
from __future__ import annotations

import builtins
import errno
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.errors import StorageError
from harness.io_safety import atomic_write_text, file_lock
from harness.probes.cache import FeatureCache
from harness.results.record import read_record

from .helpers import leftovers, one_error, ovss_args, records, run_cli, voc, write_protocol


@pytest.fixture
def setup(tmp_path):
    return {"root": voc(tmp_path / "data", n=3), "results": tmp_path / "results", "cache": tmp_path / "cache",
            "protocol": write_protocol(tmp_path), "tmp": tmp_path}


def _args(s, *extra):
    return ovss_args(s["root"], s["results"], s["cache"], s["protocol"], *extra)


def _read_only(monkeypatch, folder: Path) -> None:
    """Simulate a read-only file system under ``folder`` (tests run as root, where chmod does not stop writes):
    creating or opening a file for writing there fails with EROFS, as the kernel reports it."""
    real_open, real_os_open, real_makedirs = builtins.open, os.open, os.makedirs
    inside = str(folder.resolve())

    def under(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(inside)

    def fail(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    def fake_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and under(file) and any(c in mode for c in "wax+"):
            fail(file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            fail(path)
        return real_os_open(path, flags, *a, **k)

    def fake_makedirs(name, mode=0o777, exist_ok=False):
        if under(name) and not os.path.isdir(name):
            fail(name)
        return real_makedirs(name, mode, exist_ok)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "makedirs", fake_makedirs)


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_read_only_results_folder_fails_first_with_one_line_and_keeps_records(capsys, setup, monkeypatch) -> None:
    rc, _, err = run_cli(capsys, _args(setup))
    assert rc == 0, err
    (done,) = records(setup["results"])
    before = Path(done).read_bytes()
    _read_only(monkeypatch, setup["results"])
    rc, out, err = run_cli(capsys, _args(setup, "--force"))
    line = one_error(rc, err)
    assert str(setup["results"]) in line and "read-only" in line and "--results-dir" in line
    monkeypatch.undo()
    assert Path(done).read_bytes() == before and leftovers(setup["results"]) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder")
def test_chmod_read_only_results_folder(capsys, setup) -> None:  # pragma: no cover - not root
    setup["results"].mkdir()
    setup["results"].chmod(0o555)
    try:
        rc, out, err = run_cli(capsys, _args(setup))
        assert str(setup["results"]) in one_error(rc, err)
    finally:
        setup["results"].chmod(0o755)


def test_full_disk_while_writing_a_record_keeps_the_finished_ones(capsys, setup, monkeypatch) -> None:
    """A two-method pass: the first record is written, the disk fills up at the second (fsync reports ENOSPC)."""
    import harness.results.record as record

    real = record.write_record
    calls = []

    def second_fails(rec, path):
        calls.append(path)
        if len(calls) == 2:
            monkeypatch.setattr(os, "fsync", _enospc)
        return real(rec, path)

    monkeypatch.setattr("harness.evaluators.ovss.write_record", second_fails)
    rc, out, err = run_cli(capsys, _args(setup, "--method", "vanilla,maskclip"))
    line = one_error(rc, err)
    assert calls[1] in line and "no space left" in line and "run record" in line
    monkeypatch.undo()
    (first,) = records(setup["results"])
    assert first == calls[0] and read_record(first).method == "vanilla"
    assert leftovers(setup["results"]) == []
    created = read_record(first).created
    rc, out, err = run_cli(capsys, _args(setup, "--method", "vanilla,maskclip"))  # space freed: the same command
    assert rc == 0, err
    assert len(records(setup["results"])) == 2 and read_record(first).created == created  # not recomputed


def test_atomic_write_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch) -> None:
    path = tmp_path / "sub" / "r.json"
    atomic_write_text(str(path), '{"v": 1}', "run record")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(StorageError, match=r"cannot write run record .*r\.json: no space left on the device"):
        atomic_write_text(str(path), '{"v": 2}', "run record")
    assert json.loads(path.read_text()) == {"v": 1} and leftovers(tmp_path) == []


class _FullDisk:
    """A file object whose writes fail with ENOSPC after ``budget`` bytes (what the kernel does on a full disk)."""

    def __init__(self, f, budget: int) -> None:
        self.f, self.budget = f, budget

    def write(self, b: bytes) -> int:
        if len(b) > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_full_disk_while_filling_a_feature_cache_keeps_what_was_flushed(tmp_path, monkeypatch) -> None:
    import harness.probes.cache as cache_mod

    monkeypatch.setattr(cache_mod, "FLUSH_EVERY", 2)
    items = [np.full((4, 3), k, np.float16) for k in range(7)]
    c = FeatureCache(str(tmp_path / "c"), {"k": 1}, {"patch": "float16"})
    c.open_for_write()
    c._handles["patch"] = _FullDisk(c._handles["patch"], budget=5 * items[0].nbytes)
    with pytest.raises(StorageError, match=r"patch\.bin: no space left"):
        for it in items:
            c.append({"patch": it})
    c._handles["patch"] = c._handles["patch"].f
    c.close()
    again = FeatureCache(str(tmp_path / "c"), {"k": 1}, {"patch": "float16"})
    assert len(again) == 5  # everything written before the failure, checksums intact
    start = again.open_for_write()
    for it in items[start:]:
        again.append({"patch": it})
    again.finish()
    final = FeatureCache(str(tmp_path / "c"), {"k": 1}, {"patch": "float16"})
    assert final.complete and [float(final.get(i, "patch")[0, 0]) for i in range(7)] == list(range(7))


def test_full_disk_while_writing_the_text_cache(capsys, setup, monkeypatch) -> None:
    import harness.io_safety as io_safety

    real = io_safety.atomic_write

    def text_cache_full(path, write, what):
        if what == "text cache":
            monkeypatch.setattr(os, "fsync", _enospc)
        return real(path, write, what)

    monkeypatch.setattr(io_safety, "atomic_write", text_cache_full)
    rc, out, err = run_cli(capsys, _args(setup))
    line = one_error(rc, err)
    assert str(setup["cache"]) in line and "text cache" in line and "no space left" in line
    assert leftovers(setup["cache"]) == []


# -- two runs at once -------------------------------------------------------------------------------------
def _cli_child(args, conn) -> None:
    import sys

    from harness.cli import main

    torch.set_num_threads(1)
    sys.stderr = open(os.devnull, "w")
    conn.send(main(args))


def test_two_runs_of_the_same_record_and_cache_at_once(setup) -> None:
    """Forked processes (the parent already imported torch) run the same command on one results folder and
    cache: both succeed, the second waits for the first's lock and reads its record; one complete record."""
    ctx = multiprocessing.get_context("fork")
    procs = []
    for _ in range(2):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_cli_child, args=(_args(setup), child))
        p.start()
        procs.append((p, parent))
    codes = []
    for p, conn in procs:
        p.join(300)
        codes.append(conn.recv() if conn.poll() else p.exitcode)
    assert codes == [0, 0]
    (path,) = records(setup["results"])
    rec = json.loads(Path(path).read_text())
    assert rec["num_images"] == 3 and rec["metrics"]
    assert leftovers(setup["results"]) == [] and leftovers(setup["cache"]) == []


def _locked_appender(lock_target: str, log: str, tag: str, n: int) -> None:
    import time

    for _ in range(n):
        with file_lock(lock_target, "test file"):
            with open(log, "a") as f:
                f.write(f"{tag} start\n")
                f.flush()
                time.sleep(0.01)
                f.write(f"{tag} end\n")


def test_file_lock_excludes_other_processes(tmp_path) -> None:
    ctx = multiprocessing.get_context("fork")
    log = str(tmp_path / "log.txt")
    ps = [ctx.Process(target=_locked_appender, args=(str(tmp_path / "x"), log, t, 10)) for t in "ab"]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
    lines = Path(log).read_text().splitlines()
    assert len(lines) == 40
    for i in range(0, 40, 2):  # every start is followed by the same writer's end: no interleaving
        assert lines[i].endswith("start") and lines[i + 1] == lines[i].replace("start", "end")


def _record_writer(path: str, tag: int, n: int) -> None:
    for k in range(n):
        atomic_write_text(path, json.dumps({"tag": tag, "k": k, "pad": "x" * 20000}), "run record")


def test_concurrent_writers_never_tear_a_record(tmp_path) -> None:
    ctx = multiprocessing.get_context("fork")
    path = str(tmp_path / "r.json")
    _record_writer(path, -1, 1)
    ps = [ctx.Process(target=_record_writer, args=(path, t, 30)) for t in range(2)]
    for p in ps:
        p.start()
    seen = 0
    while any(p.is_alive() for p in ps):
        with open(path) as f:
            json.loads(f.read())  # always one complete version
        seen += 1
    for p in ps:
        p.join()
    assert json.loads(Path(path).read_text())["k"] == 29 and seen > 0 and leftovers(tmp_path) == []


def test_read_only_distill_output_folder_fails_before_training(capsys, tmp_path, monkeypatch) -> None:
    from PIL import Image

    (tmp_path / "im").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "im" / "a.png")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _read_only(monkeypatch, out_dir)
    rc, _, err = run_cli(capsys, ["distill", "phreg", "--backbone", "test-planted-clip", "--random-init", "--images",
                                  str(tmp_path / "im"), "--out", str(out_dir / "s.pth"), "--steps", "1",
                                  "--device", "cpu", "--workers", "0", "--no-progress"])
    line = one_error(rc, err)
    assert str(out_dir) in line and "--out" in line and "read-only" in line
