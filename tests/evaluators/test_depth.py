"""NYUv2: prepare/verify from a generated labeled .mat (and a BTS layout), and the depth probe end to end."""
from __future__ import annotations

import json
import os

import cv2
import h5py
import numpy as np
import pytest
import scipy.io
import torch

from harness.cli import main
from harness.datasets.nyu import verify_nyu
from harness.errors import ConfigError, DataError
from harness.evaluators.base import RunConfig
from harness.metrics.depth import DepthAccumulator
from harness.prepare.nyu import bts_name, prepare_nyu
from harness.probes.trainer import SimulatedKill
from harness.protocols import get_protocol
from harness.registry import DATASETS, EVALUATORS
from harness.synthetic.nyu import write_synthetic_nyu

from .helpers import scaled_protocol

METRICS = {"rmse", "abs_rel", "sq_rel", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3"}



def scaled_protocol_t(path, base, new_id, **overrides):
    return scaled_protocol(path, "depth", base, new_id, **overrides)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A labeled .mat with 30 frames (24 train / 6 test by its splits.mat), 480x640 like the real file."""
    return write_synthetic_nyu(str(tmp_path_factory.mktemp("nyu_raw")), num_train=24, num_test=6, seed=0)


@pytest.fixture(scope="module")
def nyu(raw, tmp_path_factory):
    mat, splits = raw
    root = str(tmp_path_factory.mktemp("nyu"))
    summary = prepare_nyu(mat, root, splits)
    assert summary["train"] == 24 and summary["test"] == 6 and summary["train_source"] == "official"
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def config(root: str, protocol: str, results: str, cache: str, **kw) -> RunConfig:
    return RunConfig(task="depth", backbone="test-vit-tiny", method="vanilla", dataset="nyu", data_root=root,
                     protocol=protocol, random_init=True, results_dir=results, cache_dir=cache, num_workers=0,
                     progress=False, **kw)


# -- data ------------------------------------------------------------------------------------------
def test_prepare_writes_mmseg_layout_with_millimetre_pngs(raw, nyu) -> None:
    mat, splits = raw
    test_idx = sorted(int(i) - 1 for i in scipy.io.loadmat(splits)["testNdxs"].ravel())
    names = sorted(os.listdir(os.path.join(nyu, "images", "test")))
    assert len(names) == 6 and all(n.endswith(".jpg") for n in names)
    assert sorted(int(n[-9:-4]) - 1 for n in names) == test_idx  # <scene>_<1-based index>.jpg
    with h5py.File(mat, "r") as f:
        i = test_idx[0]
        depth = np.asarray(f["depths"][i]).T
        rgb = np.asarray(f["images"][i]).transpose(2, 1, 0)
        scene = "".join(chr(c) for c in np.asarray(f[f["scenes"][0, i]]).ravel())
    name = f"{scene}_{i + 1:05d}"
    png = cv2.imread(os.path.join(nyu, "annotations", "test", name + ".png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and png.shape == (480, 640)
    np.testing.assert_array_equal(png, np.rint(depth.astype(np.float64) * 1000).astype(np.uint16))
    jpg = cv2.imread(os.path.join(nyu, "images", "test", name + ".jpg"))[..., ::-1]
    assert np.abs(jpg.astype(int) - rgb.astype(int)).mean() < 3  # JPEG quality 100
    ds = DATASETS.get("nyu").build(nyu, "test", [dict(type="LoadImageFromFile"),
                                                 dict(type="LoadDepthAnnotation", depth_rescale_factor=1e-3)])
    assert len(ds) == 6 and ds[0]["gt_depth_map"].max() <= 10.0


def test_verify_reports_counts_and_bad_depth_maps(nyu, tmp_path) -> None:
    problems = verify_nyu(nyu)
    assert problems == ["found 24 train images; expected 795 or 24231", "found 6 test images; expected 654"]
    assert "does not exist" in verify_nyu(str(tmp_path / "missing"))[0]
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(nyu, broken)
    ann = os.path.join(broken, "annotations", "test")
    first, second, third = sorted(os.listdir(ann))[:3]
    cv2.imwrite(os.path.join(ann, first), np.full((480, 640), 4, dtype=np.uint16))  # metres, not millimetres
    cv2.imwrite(os.path.join(ann, second), np.full((480, 640), 200, dtype=np.uint8))  # 8-bit
    os.remove(os.path.join(ann, third))
    text = "\n".join(verify_nyu(broken))
    assert "stored in metres" in text and "16-bit" in text and "have no depth map" in text


def test_prepare_errors_name_the_fix(raw, tmp_path) -> None:
    mat, _ = raw
    lonely = str(tmp_path / "alone.mat")
    os.symlink(mat, lonely)
    with pytest.raises(DataError, match="--splits"):
        prepare_nyu(lonely, str(tmp_path / "out"))
    not_hdf5 = str(tmp_path / "bad.mat")
    with open(not_hdf5, "wb") as f:
        f.write(b"MATLAB 5.0 MAT-file, not HDF5")
    with pytest.raises(DataError, match="v7.3"):
        prepare_nyu(not_hdf5, str(tmp_path / "out"), raw[1])
    wrong = str(tmp_path / "splits.mat")
    scipy.io.savemat(wrong, {"trainNdxs": np.array([[1.0], [2.0]]), "testNdxs": np.array([[2.0], [99.0]])})
    with pytest.raises(DataError, match="outside 1..30"):
        prepare_nyu(mat, str(tmp_path / "out"), wrong)


def test_bts_training_layout(raw, tmp_path) -> None:
    """BTS ``sync`` folder + its split file become images/train (mmseg converter names); the test split stays."""
    sync = tmp_path / "nyu_depth_v2" / "sync"
    lines = []
    for k, scene in enumerate(["kitchen_0028b", "bedroom_0004"]):
        os.makedirs(sync / scene)
        for j in (45, 46):
            cv2.imwrite(str(sync / scene / f"rgb_{j:05d}.jpg"), np.full((480, 640, 3), 100, np.uint8))
            cv2.imwrite(str(sync / scene / f"sync_depth_{j:05d}.png"), np.full((480, 640), 2500 + k, np.uint16))
            lines.append(f"/{scene}/rgb_{j:05d}.jpg /{scene}/sync_depth_{j:05d}.png 518.8579")
    split = tmp_path / "nyudepthv2_train_files_with_gt.txt"
    split.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "nyu_bts")
    # through the command line the depth protocol prints (`harness data prepare nyu --bts-root/--bts-split`)
    assert main(["data", "prepare", "nyu", "--mat", raw[0], "--splits", raw[1], "--out", out,
                 "--bts-root", str(sync), "--bts-split", str(split)]) == 0
    with open(os.path.join(out, "nyu_prepare.json")) as fh:
        summary = json.load(fh)
    assert summary["train"] == 4 and summary["test"] == 6 and summary["train_source"] == "bts"
    assert sorted(os.listdir(os.path.join(out, "images", "train"))) == [
        "bedroom_0004_00045.jpg", "bedroom_0004_00046.jpg", "kitchen_0028b_00045.jpg", "kitchen_0028b_00046.jpg"]
    png = cv2.imread(os.path.join(out, "annotations", "train", "bedroom_0004_00046.png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and int(png[0, 0]) == 2501
    assert bts_name("/kitchen_0028b/rgb_00045.jpg") == "kitchen_0028b_00045"
    assert verify_nyu(out) == ["found 6 test images; expected 654"]  # the train count is the split file's
    with pytest.raises(DataError, match="both --bts-root and --bts-split"):
        prepare_nyu(raw[0], out, raw[1], bts_root=str(sync))
    split.write_text("/kitchen_0028b/rgb_00099.jpg /kitchen_0028b/sync_depth_00099.png 518.8579\n")
    with pytest.raises(DataError, match="missing under --bts-root"):
        prepare_nyu(raw[0], out, raw[1], bts_root=str(sync), bts_split=str(split))


# -- probe -----------------------------------------------------------------------------------------
def test_shipped_protocols_hold_the_dvt_recipe() -> None:
    s = get_protocol("depth", "faithful").settings("nyu")
    assert s["optimizer"] == {"type": "AdamW", "lr": 5e-3, "weight_decay": 0.01, "betas": [0.9, 0.999],
                              "grad_clip": 35}
    assert s["schedule"] == {"policy": "cosine", "min_lr_ratio": 1e-8, "warmup_iters": 12800, "warmup_ratio": 1e-3,
                             "momentum": "onecycle"}
    assert (s["max_iters"], s["batch_size"], s["crop_size"], s["n_bins"], s["upsample"]) == \
        (38400, 16, [416, 544], 256, 4)
    assert (s["min_depth"], s["max_depth"], s["eigen_crop"], s["flip_test"], s["sigloss_warmup_iters"]) == \
        (0.001, 10.0, True, True, 100)
    assert get_protocol("depth", "fast").settings("nyu")["mode"] == "fast"


def baseline_rmse(root: str) -> float:
    """Independent mean-depth baseline: train-set mean valid depth, per-image RMSE on test (Eigen crop)."""
    def read(split: str) -> list:
        folder = os.path.join(root, "annotations", split)
        return [cv2.imread(os.path.join(folder, n), cv2.IMREAD_UNCHANGED) / 1000.0 for n in sorted(os.listdir(folder))]

    train = np.concatenate([d[d > 0] for d in read("train")])
    acc = DepthAccumulator(1e-3, 10.0, eigen_crop=True)
    for gt in read("test"):
        acc.update(torch.full(gt.shape, float(train.mean())), torch.from_numpy(gt))
    return acc.compute()["rmse"]


FAST_SMALL = dict(crop_size=[112, 140], batch_size=4, holdout_fraction=0.2, sigloss_warmup_iters=10,
                  eval_interval=100, checkpoint_interval=50, log_interval=10)


def test_fast_depth_probe_beats_half_the_mean_depth_baseline(nyu, cache_dir, tmp_path) -> None:
    proto = scaled_protocol_t(tmp_path / "fast-small.yaml", "fast", "fast-small", max_iters=200,
                            optimizer={"type": "AdamW", "lrs": [1e-2, 3e-2], "weight_decay": 0.01,
                                       "betas": [0.9, 0.999], "grad_clip": 35},
                            schedule={"policy": "cosine", "min_lr_ratio": 1e-8, "warmup_iters": 66,
                                      "warmup_ratio": 1e-3, "momentum": "onecycle"}, **FAST_SMALL)
    rec = EVALUATORS.get("depth")().run(config(nyu, proto, str(tmp_path / "r"), cache_dir))
    base = baseline_rmse(nyu)
    assert rec.metrics["rmse"] <= 0.5 * base, (rec.metrics, base)
    # the record's own baseline uses the mean of the cached training views (centre crops of the fit images)
    assert rec.settings["baseline_mean_depth"]["rmse"] == pytest.approx(base, rel=0.05)
    assert rec.metrics["rmse"] <= 0.5 * rec.settings["baseline_mean_depth"]["rmse"]
    assert set(rec.metrics) == METRICS and rec.task == "depth" and rec.dataset == "nyu" and rec.split == "test"
    assert rec.protocol == "fast-small" and rec.settings["mode"] == "fast" and rec.num_images == 6
    assert any("per image and averaged over images" in n for n in rec.notes)
    assert rec.settings["loss"]["gradient_loss"] == "spatial" and rec.settings["token_grid_train"] == [8, 10]
    # the shipped fast protocol (v4) trains at the token grid, each step on a random 70% window of its rows
    # and columns (6x7 of 8x10 here); the targets are pooled onto the whole grid once
    assert rec.settings["train_loss"] == "token" and rec.settings["train_target_grid"] == [8, 10]
    assert rec.settings["train_token_window"] == [0.7, 0.7] and rec.settings["train_window_grid"] == [6, 7]
    assert any("random 6x7 window of each view's 8x10 token grid" in n for n in rec.notes)
    assert rec.protocol_version == get_protocol("depth", "fast").version == 4
    assert 0 <= rec.metrics["delta1"] <= 100 and rec.metrics["delta1"] > 90  # percent, as the papers print it
    assert os.path.isfile(rec.settings["artifacts"]["curves_png"])


@pytest.mark.parametrize("train_loss,grid", [("token", [8, 10]), ("head-output", [32, 40]), ("pixel", None)])
def test_fast_depth_keeps_the_version_1_to_3_losses_selectable(nyu, cache_dir, tmp_path, train_loss, grid) -> None:
    """A copied fast YAML with the whole token grid (v3), ``train_loss: head-output`` (v2) or ``pixel`` (v1)
    still trains that way."""
    proto = scaled_protocol_t(tmp_path / "fast-old.yaml", "fast", "fast-old", max_iters=3, train_loss=train_loss,
                              train_token_window=[1.0, 1.0], **{**FAST_SMALL, "eval_interval": 3, "log_interval": 1})
    rec = EVALUATORS.get("depth")().run(config(nyu, proto, str(tmp_path / "r"), cache_dir))  # caches shared
    assert rec.settings["train_loss"] == train_loss and rec.settings.get("train_target_grid") == grid
    assert rec.settings["train_token_window"] == [1.0, 1.0] and "train_window_grid" not in rec.settings
    assert not any("window of each view" in n for n in rec.notes)
    assert set(rec.metrics) == METRICS


def test_faithful_depth_runs_and_resumes_after_a_kill(nyu, cache_dir, tmp_path) -> None:
    proto = scaled_protocol_t(tmp_path / "faithful-small.yaml", "faithful", "faithful-small", crop_size=[112, 140],
                            max_iters=6, batch_size=2, eval_interval=3, checkpoint_interval=2, log_interval=1,
                            sigloss_warmup_iters=2, schedule={"policy": "cosine", "min_lr_ratio": 1e-8,
                                                             "warmup_iters": 2, "warmup_ratio": 1e-3,
                                                             "momentum": "onecycle"})
    ref = EVALUATORS.get("depth")().run(config(nyu, proto, str(tmp_path / "a"), cache_dir, limit=4))
    assert ref.settings["mode"] == "faithful" and set(ref.metrics) == METRICS and ref.num_images == 4
    with pytest.raises(SimulatedKill):
        EVALUATORS.get("depth")().run(config(nyu, proto, str(tmp_path / "b"), cache_dir, limit=4,
                                             extra={"kill_after_iters": 5}))
    resumed = EVALUATORS.get("depth")().run(config(nyu, proto, str(tmp_path / "b"), cache_dir, limit=4))
    assert resumed.settings["resumed_from_iter"] == 4
    assert resumed.metrics == ref.metrics


def test_depth_needs_a_depth_dataset(tmp_path) -> None:
    cfg = RunConfig(task="depth", backbone="test-vit-tiny", method="vanilla", dataset="voc21",
                    data_root=str(tmp_path), random_init=True, results_dir=str(tmp_path), progress=False)
    with pytest.raises(ConfigError, match="no entry for dataset 'voc21'"):
        EVALUATORS.get("depth")().run(cfg)


def test_fast_baseline_mean_depth_streams_over_the_cache(tmp_path) -> None:
    """The mean-depth baseline of ``fast`` reads one cached map at a time: on the BTS split (~22k fit views of
    416x544) concatenating every valid pixel as float64 needed tens of GB. Same value, bounded memory."""
    import tracemalloc

    from harness.evaluators.depth import mean_valid_depth
    from harness.probes.cache import FeatureCache

    rng = np.random.default_rng(0)
    cache = FeatureCache(str(tmp_path / "c"), {"k": 1}, {"depth": "uint16"})
    cache.open_for_write()
    maps = []
    for _ in range(40):
        d = rng.integers(0, 10000, size=(416, 544)).astype(np.uint16)
        d[:, :50] = 0  # padding / invalid
        maps.append(d)
        cache.append({"depth": d})
    cache.finish()
    idx = list(range(0, 40, 2)) + [1, 3]
    valid = np.concatenate([maps[i][maps[i] > 0].astype(np.float64) for i in idx])
    tracemalloc.start()
    got = mean_valid_depth(cache, idx, 0.001)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == pytest.approx(valid.mean() * 0.001, rel=1e-12)
    assert peak < 4 * 416 * 544 * 8  # a few maps' worth, not all 22 (the old concatenation peaked at ~60 MB here)
    assert np.isnan(mean_valid_depth(cache, [], 0.001))
