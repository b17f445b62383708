"""User-facing CLI errors: one concise message, exit status 2, no traceback unless ``--debug``.

Most cases go through ``harness.cli.main([...])`` in-process (stderr captured); a few run the real
``python -m harness.cli`` in a subprocess, so the exit status and the absence of a traceback are
checked exactly as a user sees them. Every weight lookup points at empty temporary caches
(HF_HOME / HF_HUB_CACHE / HOME), so the real user cache is never read or written.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from harness.cli import main
from harness.synthetic.segmentation import write_synthetic_dataset

CLIP_REPO_DIR = "models--timm--vit_base_patch16_clip_224.openai"
FETCH = "huggingface-cli download timm/vit_base_patch16_clip_224.openai"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dict[str, Path]:
    """Empty HF / clip / harness caches under tmp_path; offline."""
    paths = {"hf_home": tmp_path / "hf", "hub": tmp_path / "hf" / "hub", "home": tmp_path / "home",
             "cache": tmp_path / "harness-cache", "results": tmp_path / "results"}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(paths["hf_home"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(paths["hub"]))
    monkeypatch.setenv("HOME", str(paths["home"]))
    monkeypatch.setenv("HARNESS_CACHE", str(paths["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return paths


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    return Path(write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=3, size=(96, 128)))


def run_args(root: Path, env: Dict[str, Path], *extra: str, backbone: str = "clip-b16-openai",
             dataset: str = "voc21", random_init: bool = True) -> List[str]:
    args = ["run", "ovss", "--backbone", backbone, "--dataset", dataset, "--data-root", str(root),
            "--results-dir", str(env["results"]), "--cache-dir", str(env["cache"]), "--device", "cpu",
            "--workers", "0", "--no-progress", *extra]
    return args + (["--random-init"] if random_init else [])


def assert_one_error(rc: int, err: str, out: str = "") -> str:
    """Exit status 2, exactly one ``harness: error:`` message, no traceback; returns the message."""
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert err.count("harness: error:") == 1, err
    assert err.count("harness:") == 1, err  # no second, "unexpected" message either
    assert len(err) < 2000, err  # concise
    assert out.strip() == "", out  # nothing half-done reported on stdout
    return err[err.index("harness: error:"):]


def cli(capsys: pytest.CaptureFixture, args: List[str]) -> tuple:
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def subprocess_cli(args: List[str], env: Dict[str, Path], cwd: Path) -> subprocess.CompletedProcess:
    e = dict(os.environ, HF_HOME=str(env["hf_home"]), HF_HUB_CACHE=str(env["hub"]), HOME=str(env["home"]),
             HARNESS_CACHE=str(env["cache"]), HF_HUB_OFFLINE="1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=e,
                          cwd=str(cwd), timeout=120)


# -- data ---------------------------------------------------------------------------------------
def test_missing_data_root(capsys, env, tmp_path):
    missing = tmp_path / "no" / "such" / "VOC2012"
    rc, out, err = cli(capsys, run_args(missing, env))
    msg = assert_one_error(rc, err, out)
    assert str(missing) in msg and "does not exist" in msg
    assert "VOCdevkit/VOC2012" in msg  # says what the root should be


def test_missing_data_root_subprocess(env, tmp_path):
    missing = tmp_path / "nowhere"
    p = subprocess_cli(run_args(missing, env), env, tmp_path)
    msg = assert_one_error(p.returncode, p.stderr, p.stdout)
    assert str(missing) in msg


def test_wrong_layout_no_segmentation_class(capsys, env, voc_root):
    shutil.rmtree(voc_root / "SegmentationClass")
    rc, out, err = cli(capsys, run_args(voc_root, env))
    msg = assert_one_error(rc, err, out)
    assert str(voc_root / "SegmentationClass") in msg


def test_parent_folder_suggests_nested_root(capsys, env, voc_root):
    parent = voc_root.parent.parent  # .../data, holding VOCdevkit/VOC2012
    rc, out, err = cli(capsys, run_args(parent, env))
    msg = assert_one_error(rc, err, out)
    assert str(voc_root) in msg


def test_label_map_of_wrong_size(capsys, env, voc_root, monkeypatch):
    from harness.text import templates

    # one template instead of 80: the text side is not under test here and 21 x 80 prompts cost ~1 min on CPU
    monkeypatch.setitem(templates.TEMPLATE_SETS, "openai_imagenet_80", ["a photo of a {}."])
    first = (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    label = voc_root / "SegmentationClass" / f"{first}.png"
    image = voc_root / "JPEGImages" / f"{first}.jpg"
    with Image.open(image) as im:
        iw, ih = im.size
    lw, lh = iw + 13, ih - 7
    Image.fromarray(np.zeros((lh, lw), np.uint8)).save(label)
    rc, out, err = cli(capsys, run_args(voc_root, env, "--limit", "2"))
    msg = assert_one_error(rc, err, out)
    assert str(label) in msg
    for w, h in ((lw, lh), (iw, ih)):
        assert f"{w}x{h}" in msg or f"{h}x{w}" in msg, (w, h, msg)


# -- weights ------------------------------------------------------------------------------------
def check_missing_weights_message(msg: str, env: Dict[str, Path]) -> None:
    assert str(env["hub"] / CLIP_REPO_DIR) in msg  # the cache path that was searched
    assert FETCH in msg  # the command that fetches the file
    assert "--weights" in msg and "--random-init" in msg
    assert "clip-b16-openai" in msg


def test_missing_weights(capsys, env, voc_root):
    rc, out, err = cli(capsys, run_args(voc_root, env, random_init=False))
    check_missing_weights_message(assert_one_error(rc, err, out), env)
    assert not any(env["hub"].iterdir())  # nothing was fetched or created


def test_missing_weights_subprocess(env, voc_root, tmp_path):
    p = subprocess_cli(run_args(voc_root, env, random_init=False), env, tmp_path)
    check_missing_weights_message(assert_one_error(p.returncode, p.stderr, p.stdout), env)


def test_weights_file_that_does_not_exist(capsys, env, voc_root, tmp_path):
    missing = tmp_path / "nope.bin"
    rc, out, err = cli(capsys, run_args(voc_root, env, "--weights", str(missing), random_init=False))
    assert str(missing) in assert_one_error(rc, err, out)


# -- unknown names ------------------------------------------------------------------------------
@pytest.mark.parametrize("option,wrong,nearest", [
    ("--backbone", "clip-b16-opnai", "clip-b16-openai"),
    ("--method", "naclp", "naclip"),
    ("--dataset", "voc211", "voc21"),
    ("--protocol", "phrg", "phreg"),
])
def test_unknown_name_suggests_nearest(capsys, env, tmp_path, option, wrong, nearest):
    args = run_args(tmp_path, env)
    if option in args:
        args[args.index(option) + 1] = wrong
    else:
        args += [option, wrong]
    rc, out, err = cli(capsys, args)
    msg = assert_one_error(rc, err, out)
    assert repr(wrong) in msg or wrong in msg
    assert "Did you mean" in msg and nearest in msg
    assert "harness list" in msg


def test_unknown_task_is_an_argparse_error(capsys, env, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(run_args(tmp_path, env)[:1] + ["ovsss"] + run_args(tmp_path, env)[2:])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err


# -- --debug ------------------------------------------------------------------------------------
def test_debug_propagates_the_exception(capsys, env, tmp_path, voc_root):
    from harness.errors import DataError, WeightsError
    from harness.registry import RegistryError

    with pytest.raises(RegistryError, match="clip-b16-openai"):
        main(["--debug", *run_args(tmp_path, env, backbone="clip-b16-opnai")])
    with pytest.raises(DataError, match="does not exist"):
        main(["--debug", *run_args(tmp_path / "missing", env)])
    with pytest.raises(WeightsError, match="--random-init"):
        main(["--debug", *run_args(voc_root, env, random_init=False)])
    assert "harness: error" not in capsys.readouterr().err


def test_debug_subprocess_prints_traceback(env, tmp_path):
    args = run_args(tmp_path / "missing", env)
    p = subprocess_cli(["--debug", *args], env, tmp_path)
    assert p.returncode != 0
    assert "Traceback" in p.stderr and "DataError" in p.stderr
    assert "harness: error:" not in p.stderr


# -- list / help --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["backbones", "methods", "datasets", "protocols", "evaluators"])
def test_list_prints_every_registered_name(capsys, kind):
    from harness import registry
    from harness.protocols import PROTOCOLS

    reg = {"backbones": registry.BACKBONES, "methods": registry.METHODS, "datasets": registry.DATASETS,
           "evaluators": registry.EVALUATORS, "protocols": PROTOCOLS}[kind]
    rc, out, err = cli(capsys, ["list", kind])
    assert rc == 0 and err == ""
    first_words = [ln.split()[0] for ln in out.splitlines() if ln.strip()]
    assert first_words == reg.names()
    expected = {"backbones": "clip-b16-openai", "methods": "naclip", "datasets": "voc21",
                "evaluators": "ovss", "protocols": "ovss/phreg"}[kind]
    assert expected in first_words
    if kind == "methods":
        assert "aliases: clip" in out


def test_help_does_not_import_torch(tmp_path):
    code = ("import sys, harness.cli\n"
            "harness.cli.build_parser()\n"
            "try:\n"
            "    harness.cli.main(['--help'])\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "print('torch' in sys.modules)\n")
    e = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env=e,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "False"
    assert "usage: harness" in p.stdout
    for command in ("run", "list", "data", "report", "demo"):
        assert command in p.stdout
