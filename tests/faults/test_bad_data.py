"""Bad data: a corrupt or truncated JPEG, a truncated PNG, label ids out of range, image/label size mismatch, an
empty data folder. Each stops ``harness run`` with one line naming the file (exit 2), or with
``--on-bad-image skip`` is left out, listed in a record marked partial, and shown as partial on the leaderboard.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from harness.datasets.safety import file_problem
from harness.results.report import write_report

from .helpers import (
    copy_without,
    corrupt_bytes,
    linear_protocol,
    one_error,
    ovss_args,
    records,
    run_cli,
    sample_paths,
    truncate,
    voc,
    write_protocol,
)


@pytest.fixture
def setup(tmp_path):
    return {"root": voc(tmp_path / "data"), "results": tmp_path / "results", "cache": tmp_path / "cache",
            "protocol": write_protocol(tmp_path), "tmp": tmp_path}


def _args(s, *extra):
    return ovss_args(s["root"], s["results"], s["cache"], s["protocol"], *extra)


def test_file_problem_finds_truncation_and_garbage_and_accepts_good_files(tmp_path) -> None:
    arr = (np.arange(40 * 56 * 3) % 251).astype(np.uint8).reshape(40, 56, 3)
    jpg, png = tmp_path / "a.jpg", tmp_path / "a.png"
    Image.fromarray(arr).save(jpg, quality=90)
    Image.fromarray(arr[..., 0]).save(png)
    assert file_problem(str(jpg)) is None and file_problem(str(png)) is None
    # a JPEG must end with the EOI marker FFD9, a PNG with the IEND chunk (checked by hand on the raw bytes)
    assert jpg.read_bytes()[-2:] == b"\xff\xd9" and png.read_bytes()[-8:] == b"IEND\xaeB`\x82"
    truncate(jpg, 0.6)
    truncate(png, 0.9)
    assert "truncated JPEG" in file_problem(str(jpg))
    assert "truncated PNG" in file_problem(str(png))
    corrupt_bytes(jpg)
    assert "not a readable image" in file_problem(str(jpg))
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty" in file_problem(str(tmp_path / "empty.png"))
    assert "does not exist" in file_problem(str(tmp_path / "missing.png"))


@pytest.mark.parametrize("fault,expect", [
    ("corrupt_jpeg", "is not a readable image"),
    ("truncated_jpeg", "is a truncated JPEG"),
    ("truncated_png", "is a truncated PNG"),
    ("size_mismatch", "has size"),
])
def test_bad_file_fails_before_any_work_with_one_line(capsys, setup, fault, expect) -> None:
    img, lab = sample_paths(setup["root"], 1)
    bad = lab if fault in ("truncated_png", "size_mismatch") else img
    if fault == "corrupt_jpeg":
        corrupt_bytes(img)
    elif fault == "truncated_jpeg":
        truncate(img, 0.5)
    elif fault == "truncated_png":
        truncate(lab, 0.8)
    else:
        Image.fromarray(np.zeros((13, 17), np.uint8)).save(lab)
    rc, out, err = run_cli(capsys, _args(setup))
    line = one_error(rc, err)
    assert str(bad) in line and expect in line and "--on-bad-image skip" in line
    assert records(setup["results"]) == []  # nothing half-done was written


@pytest.mark.parametrize("workers", [0, 1])
def test_label_ids_out_of_range_fail_naming_the_label_map(capsys, setup, workers) -> None:
    """Found while loading (the screen reads headers only), also inside a DataLoader worker process."""
    _, lab = sample_paths(setup["root"], 2)
    arr = np.asarray(Image.open(lab)).copy()
    arr[:3, :3] = 57  # voc21 has ids 0..20 and 255
    Image.fromarray(arr).save(lab)
    rc, out, err = run_cli(capsys, _args(setup, "--workers", str(workers)))
    line = one_error(rc, err)
    assert str(lab) in line and "[57]" in line and "21 classes" in line


def test_empty_data_folder(capsys, tmp_path) -> None:
    root = voc(tmp_path / "data", n=2)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("")
    for p in (root / "JPEGImages").iterdir():
        p.unlink()
    rc, out, err = run_cli(capsys, ovss_args(root, tmp_path / "r", tmp_path / "c", write_protocol(tmp_path)))
    line = one_error(rc, err)
    assert "no val images" in line and str(root) in line and err.count("\n") == 1


def test_empty_image_folder_for_distill(capsys, tmp_path) -> None:
    (tmp_path / "imgs").mkdir()
    rc, out, err = run_cli(capsys, ["distill", "phreg", "--backbone", "test-planted-clip", "--random-init", "--images",
                                    str(tmp_path / "imgs"), "--out", str(tmp_path / "o" / "s.pth"), "--steps", "1",
                                    "--device", "cpu", "--workers", "0", "--no-progress"])
    line = one_error(rc, err)
    assert str(tmp_path / "imgs") in line and "no image files" in line


def test_skip_leaves_bad_samples_out_lists_them_and_marks_the_record_partial(capsys, setup) -> None:
    s = setup
    reference = copy_without(s["root"], s["tmp"] / "clean" / "VOC2012", drop=[0, 1, 2])
    img0, _ = sample_paths(s["root"], 0)
    _, lab1 = sample_paths(s["root"], 1)
    _, lab2 = sample_paths(s["root"], 2)
    truncate(img0, 0.5)
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(lab1)  # other size
    arr = np.asarray(Image.open(lab2)).copy()
    arr[0, 0] = 99
    Image.fromarray(arr).save(lab2)  # id out of range
    rc, out, err = run_cli(capsys, _args(s, "--on-bad-image", "skip"))
    assert rc == 0, err
    assert "skipping 3 bad sample(s)" in err
    (path,) = records(s["results"])
    rec = json.loads(open(path).read())
    assert rec["partial"] is True and rec["num_images"] == 1
    skipped = {d["image"]: d["reason"] for d in rec["skipped_images"]}
    assert set(skipped) == {str(sample_paths(s["root"], k)[0]) for k in range(3)}
    assert "truncated JPEG" in skipped[str(img0)]
    assert str(lab1) in skipped[str(sample_paths(s["root"], 1)[0])]
    assert "[99]" in skipped[str(sample_paths(s["root"], 2)[0])]
    assert any("partial: 3 bad sample(s) skipped" in n for n in rec["notes"])
    # the numbers are those of the same run on a copy without the bad samples
    rc, out, err = run_cli(capsys, ovss_args(reference, s["tmp"] / "ref", s["cache"], s["protocol"]))
    assert rc == 0, err
    (ref_path,) = records(s["tmp"] / "ref")
    ref = json.loads(open(ref_path).read())
    assert ref["partial"] is False and ref["skipped_images"] == []
    assert rec["metrics"] == ref["metrics"] and rec["per_class"] == ref["per_class"]
    # the leaderboard shows the skip run as partial, the clean run as full
    write_report(str(s["results"]))
    md = (s["results"] / "LEADERBOARD.md").read_text()
    assert "3 bad image(s) skipped" in md and "†" in md
    with open(s["results"] / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["partial"] == "True" for r in rows if r["source"] == "ours")
    # a record is partial by its flag alone, even when the split has no official count to compare with
    from harness.results.record import read_record
    from harness.results.selection import is_partial

    skip_rec, ref_rec = read_record(path), read_record(ref_path)
    assert is_partial(skip_rec, official_counts={}) and not is_partial(ref_rec, official_counts={})
    write_report(str(s["tmp"] / "ref"))
    assert "bad image(s) skipped" not in (s["tmp"] / "ref" / "LEADERBOARD.md").read_text()


def test_a_skip_run_never_shares_its_record_with_a_fail_run(capsys, setup) -> None:
    rc, _, err = run_cli(capsys, _args(setup))
    assert rc == 0, err
    rc, _, err = run_cli(capsys, _args(setup, "--on-bad-image", "skip"))
    assert rc == 0, err
    paths = records(setup["results"])
    assert len(paths) == 2
    recs = [json.loads(open(p).read()) for p in paths]
    assert all(r["partial"] is False for r in recs) and recs[0]["metrics"] == recs[1]["metrics"]


def test_skip_in_a_probe_run_marks_its_record_partial(capsys, tmp_path) -> None:
    """linear-seg builds its training and evaluation splits through the same screen."""
    from harness.synthetic.segmentation import write_demo_voc

    root = write_demo_voc(str(tmp_path / "d"), 8, (96, 128), 0, "train")
    write_demo_voc(str(tmp_path / "d"), 3, (96, 128), 0, "val")
    ids = (tmp_path / "d" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    bad = tmp_path / "d" / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{ids[3]}.jpg"
    truncate(bad, 0.4)
    args = ["run", "linear-seg", "--backbone", "test-vit-tiny", "--random-init", "--dataset", "voc21", "--data-root",
            root, "--protocol", linear_protocol(tmp_path / "p.yaml"), "--results-dir", str(tmp_path / "r"),
            "--cache-dir", str(tmp_path / "c"), "--device", "cpu", "--workers", "0", "--no-progress"]
    rc, _, err = run_cli(capsys, args)
    assert str(bad) in one_error(rc, err)
    rc, _, err = run_cli(capsys, args + ["--on-bad-image", "skip"])
    assert rc == 0, err
    (path,) = records(tmp_path / "r")
    rec = json.loads(open(path).read())
    assert rec["partial"] is True and [d["image"] for d in rec["skipped_images"]] == [str(bad)]


def test_suite_passes_on_bad_image_to_every_run(capsys, setup) -> None:
    """``harness suite --on-bad-image skip``: each cell skips the bad sample and is marked partial; the
    default (fail) stops the suite at the bad file with one line."""
    import yaml

    s = setup
    img0, _ = sample_paths(s["root"], 0)
    corrupt_bytes(img0)
    data_dir = s["root"].parent
    suite = {"task": "ovss", "protocol": s["protocol"], "backbones": ["test-planted-clip"],
             "methods": ["maskclip", "naclip"], "datasets": {"voc21": s["root"].name}}
    (s["tmp"] / "suite.yaml").write_text(yaml.safe_dump(suite))
    base = ["suite", str(s["tmp"] / "suite.yaml"), "--data-dir", str(data_dir), "--random-init", "--workers", "0",
            "--device", "cpu", "--results-dir", str(s["results"]), "--cache-dir", str(s["cache"]), "--no-progress"]
    rc, _, err = run_cli(capsys, base)
    assert rc == 2 and str(img0) in one_error(rc, err)
    assert records(s["results"]) == []
    rc, _, err = run_cli(capsys, base + ["--on-bad-image", "skip"])
    assert rc == 0, err
    recs = [json.loads(open(p).read()) for p in records(s["results"])]
    assert sorted(r["method"] for r in recs) == ["maskclip", "naclip"]
    assert all(r["partial"] and [d["image"] for d in r["skipped_images"]] == [str(img0)] for r in recs)
