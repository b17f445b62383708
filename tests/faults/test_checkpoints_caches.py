"""A truncated or foreign checkpoint (backbone weights, method weights, probe and distillation checkpoints) is one
line naming the file and what was expected (exit 2); a corrupt text or feature cache entry is detected by its
checksum, rebuilt and never used.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.errors import WeightsError
from harness.probes.cache import FeatureCache
from harness.probes.heads import HeadBank, LinearSegHead
from harness.probes.schedules import Schedule
from harness.probes.trainer import ProbeTrainer

from .helpers import one_error, run_cli, voc


class Foreign:
    """A class pickled into a file: ``torch.load(weights_only=True)`` must refuse to build it."""

    def __init__(self) -> None:
        self.x = 1


def _truncated_torch_file(path: Path) -> Path:
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _foreign_pickle(path: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump(Foreign(), f, protocol=2)
    return path


@pytest.fixture
def voc_root(tmp_path):
    return voc(tmp_path / "data", n=2)


def _linear_args(root, tmp_path, *extra):
    return ["run", "linear-seg", "--backbone", "test-vit-tiny", "--dataset", "voc21", "--data-root", str(root),
            "--protocol", "fast", "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
            "--device", "cpu", "--workers", "0", "--no-progress", *extra]


@pytest.mark.parametrize("kind", ["truncated", "foreign", "other-model"])
def test_backbone_weights(capsys, tmp_path, voc_root, kind) -> None:
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        _truncated_torch_file(path)
    elif kind == "foreign":
        _foreign_pickle(path)
    else:
        torch.save({"fc.weight": torch.zeros(3, 3)}, path)  # a readable state dict of another network
    rc, _, err = run_cli(capsys, _linear_args(voc_root, tmp_path, "--weights", str(path)))
    line = one_error(rc, err)
    assert f"--weights {path}" in line
    assert ("does not match" in line) if kind == "other-model" else ("could not load" in line)
    assert len(line) < 600


@pytest.mark.parametrize("kind", ["truncated", "foreign"])
def test_method_weights(capsys, tmp_path, voc_root, kind) -> None:
    path = tmp_path / f"{kind}.pt"
    (_truncated_torch_file if kind == "truncated" else _foreign_pickle)(path)
    rc, _, err = run_cli(capsys, _linear_args(voc_root, tmp_path, "--random-init", "--method", "dvt",
                                              "--method-weights", str(path)))
    line = one_error(rc, err)
    assert f"--method-weights {path}" in line and "expected" in line


def _trainer(ckpt: Path) -> ProbeTrainer:
    torch.manual_seed(0)
    heads = HeadBank([LinearSegHead(8, 3)])
    return ProbeTrainer(heads, ["lr=0.1"], [0.1], 0.0, (0.9, 0.999), None,
                        Schedule({"policy": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 0,
                                  "warmup_ratio": 1e-6}, 4), 4, str(ckpt), "fp", 2, 1, progress=False)


@pytest.mark.parametrize("kind", ["truncated", "foreign", "not-ours"])
def test_probe_checkpoint(tmp_path, kind) -> None:
    ckpt = tmp_path / "run.ckpt.pt"
    if kind == "truncated":
        _truncated_torch_file(ckpt)
    elif kind == "foreign":
        _foreign_pickle(ckpt)
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    with pytest.raises(WeightsError) as e:
        _trainer(ckpt).resume()
    msg = str(e.value)
    assert "\n" not in msg and str(ckpt) in msg and "delete it" in msg
    assert ("not a harness probe checkpoint" in msg) if kind == "not-ours" else ("unreadable" in msg)


def test_probe_checkpoint_round_trip_loads_with_weights_only(tmp_path) -> None:
    t = _trainer(tmp_path / "ok.ckpt.pt")
    t.iteration = 3
    t.curves.add(2, "train", "lr=0.1", "loss", 0.5)
    t.save()
    torch.load(tmp_path / "ok.ckpt.pt", weights_only=True)  # the file needs no pickled classes
    u = _trainer(tmp_path / "ok.ckpt.pt")
    assert u.resume() == 3 and u.curves.rows == t.curves.rows


def _distill_args(images: Path, out: Path, *extra: str) -> list:
    return ["distill", "phreg", "--backbone", "test-planted-clip", "--random-init", "--images", str(images),
            "--out", str(out), "--resolution", "32", "--batch-size", "2", "--device", "cpu", "--workers", "0",
            "--no-progress", *extra]


def _images(folder: Path, n: int = 2) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("kind", ["truncated", "foreign"])
def test_distill_checkpoint(capsys, tmp_path, kind) -> None:
    images, out = _images(tmp_path / "im"), tmp_path / "o" / "student.pth"
    out.parent.mkdir()
    ckpt = Path(str(out) + ".ckpt.pt")
    (_truncated_torch_file if kind == "truncated" else _foreign_pickle)(ckpt)
    rc, _, err = run_cli(capsys, _distill_args(images, out, "--steps", "2"))
    line = one_error(rc, err)
    assert str(ckpt) in line and "distillation checkpoint" in line and "delete it" in line


def test_distill_checkpoint_resumes_with_weights_only(capsys, tmp_path) -> None:
    """The RNG states are stored as tensors and lists: the file loads with weights_only=True and resumes."""
    from harness.distill.common import _rng_state, _set_rng_state, load_checkpoint

    np.random.seed(3)
    torch.manual_seed(3)
    state = _rng_state()
    path = tmp_path / "x.ckpt.pt"
    torch.save({"fingerprint": "f", "step": 1, "rng": state, "modules": {}}, path)
    expect = (np.random.rand(), torch.rand(1).item())
    np.random.seed(9)
    torch.manual_seed(9)
    _set_rng_state(load_checkpoint(str(path))["rng"])
    assert (np.random.rand(), torch.rand(1).item()) == expect


def test_distill_checkpoint_gives_each_torchrun_rank_its_own_generators(tmp_path) -> None:
    """Under torchrun every rank's RNG states are saved (each draws its own LoRA dropout) and each rank resumes
    from its own; a job with another number of ranks resumes from rank 0's, as before."""
    from harness.distill.common import DistillLoop, _rng_state, load_checkpoint
    from harness.runtime import Dist

    torch.manual_seed(1)
    rank1 = _rng_state()
    expect1 = torch.rand(3)  # what rank 1 draws next
    torch.manual_seed(0)
    out = str(tmp_path / "student.pt")

    def loop(rank: int, world: int) -> DistillLoop:
        d = Dist(rank=rank, world_size=world)
        d.gather = lambda obj: [obj, rank1][:world]  # rank 0's states, then rank 1's (a fake all_gather)
        return DistillLoop(out=out, total_steps=4, fingerprint="f", modules={}, show_progress=False, dist=d)

    loop(0, 2).save(2)
    expect0 = torch.rand(3)  # what rank 0 draws next
    state = load_checkpoint(out + ".ckpt.pt")
    assert len(state["rng_ranks"]) == 2 and torch.equal(state["rng"]["torch"], state["rng_ranks"][0]["torch"])
    for rank, world, expect in [(1, 2, expect1), (0, 2, expect0), (0, 1, expect0)]:
        torch.manual_seed(99)
        assert loop(rank, world).resume() == 2
        assert torch.equal(torch.rand(3), expect), (rank, world)
    loop(0, 1).save(3)  # one process: no per-rank list
    assert "rng_ranks" not in load_checkpoint(out + ".ckpt.pt")


# -- caches -----------------------------------------------------------------------------------------------
def test_corrupt_feature_cache_is_detected_rebuilt_and_never_used(tmp_path, capsys) -> None:
    items = [np.full((2, 3), k + 0.5, np.float16) for k in range(3)]
    path = str(tmp_path / "c")
    c = FeatureCache(path, {"k": 1}, {"patch": "float16"})
    c.open_for_write()
    for it in items:
        c.append({"patch": it})
    c.finish()
    raw = bytearray(Path(path, "patch.bin").read_bytes())
    raw[7] ^= 0x40  # one flipped bit in the second item
    Path(path, "patch.bin").write_bytes(bytes(raw))
    again = FeatureCache(path, {"k": 1}, {"patch": "float16"})
    err = capsys.readouterr().err
    assert f"feature cache {path}: patch.bin fails its checksum; rebuilding it" in err
    assert len(again) == 0 and not again.complete and not os.path.exists(os.path.join(path, "patch.bin"))
    # a corrupt index or metadata file is rebuilt too
    again.open_for_write()
    for it in items:
        again.append({"patch": it})
    again.finish()
    Path(path, "meta.json").write_text("{not json")
    assert len(FeatureCache(path, {"k": 1}, {"patch": "float16"})) == 0
    assert "meta.json is unreadable" in capsys.readouterr().err


def test_corrupt_text_cache_entry_is_detected_by_checksum_and_rebuilt(tmp_path, capsys) -> None:
    from harness.models import build_dense_model
    from harness.text.encoder import class_queries, tensors_digest

    model = build_dense_model("test-planted-clip", "vanilla", random_init=True)
    names = [["cat"], ["dog", "puppy"]]
    fresh = class_queries(model, names, "gem_single", torch.device("cpu"), str(tmp_path))
    (path,) = [p for p in (tmp_path / "text").glob("*.pt")]
    data = torch.load(path, weights_only=True)
    assert data["sha256"] == tensors_digest({"embeddings": fresh.embeddings})
    bad = data["embeddings"].clone()
    bad[0, 0] += 0.25  # a readable file with wrong numbers: only the checksum can tell
    torch.save({**data, "embeddings": bad}, path)
    got = class_queries(model, names, "gem_single", torch.device("cpu"), str(tmp_path))
    assert "text cache" in capsys.readouterr().err
    assert not got.cache_hit and torch.equal(got.embeddings, fresh.embeddings)
    assert torch.equal(torch.load(path, weights_only=True)["embeddings"], fresh.embeddings)  # rewritten
    hit = class_queries(model, names, "gem_single", torch.device("cpu"), str(tmp_path))
    assert hit.cache_hit and torch.equal(hit.embeddings, fresh.embeddings)
