"""The on-disk feature cache: ragged items, fp16 round trip, resumable writing, configuration guard."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from harness.probes import cache as cache_mod
from harness.probes.cache import CacheError, FeatureCache, cache_dir_name

FIELDS = {"patch": "float16", "label": "uint8"}


def item(i: int, h: int = 3) -> dict:
    return {"patch": np.full((4, h, 5), i, dtype=np.float32) + 0.25, "label": np.full((h * 2, 10), i, dtype=np.uint8)}


def test_round_trip_with_ragged_items(tmp_path) -> None:
    c = FeatureCache(str(tmp_path / "c"), {"k": 1}, FIELDS)
    assert c.open_for_write() == 0
    for i in range(5):
        c.append(item(i, h=3 + i % 2))
    c.finish()
    r = FeatureCache(str(tmp_path / "c"), {"k": 1}, FIELDS)
    assert r.complete and len(r) == 5
    assert r.get(3, "patch").dtype == np.float16 and r.shape(3, "patch") == (4, 4, 5)
    np.testing.assert_array_equal(r.get(3, "patch"), np.full((4, 4, 5), 3.25, dtype=np.float16))
    np.testing.assert_array_equal(r.get(4, "label"), np.full((6, 10), 4, dtype=np.uint8))
    t = r.stack([0, 2, 4], "patch", torch.float32)
    assert t.shape == (3, 4, 3, 5) and t[1, 0, 0, 0].item() == 2.25
    assert r.nbytes == sum(os.path.getsize(tmp_path / "c" / f"{f}.bin") for f in FIELDS)


def test_interrupted_writing_resumes_from_the_last_flush(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cache_mod, "FLUSH_EVERY", 2)
    c = FeatureCache(str(tmp_path / "c"), {"k": 1}, FIELDS)
    c.open_for_write()
    for i in range(5):
        c.append(item(i))  # flushed after items 2 and 4; item 5 is written but not flushed
    c._handles["patch"].flush()  # a crash now: bytes of item 5 on disk, the index does not know them
    del c
    r = FeatureCache(str(tmp_path / "c"), {"k": 1}, FIELDS)
    assert len(r) == 4 and not r.complete
    assert r.open_for_write() == 4
    r.append(item(4))
    r.append(item(5))
    r.finish()
    done = FeatureCache(str(tmp_path / "c"), {"k": 1}, FIELDS)
    assert len(done) == 6
    for i in range(6):
        assert done.get(i, "label")[0, 0] == i


def test_cache_for_another_configuration_is_refused(tmp_path) -> None:
    c = FeatureCache(str(tmp_path / "c"), {"weights": "aaa"}, FIELDS)
    c.open_for_write()
    c.append(item(0))
    c.finish()
    with pytest.raises(CacheError, match="another configuration"):
        FeatureCache(str(tmp_path / "c"), {"weights": "bbb"}, FIELDS)


def test_directory_name_is_readable_and_keyed() -> None:
    a = cache_dir_name({"backbone": "dinov2-b14", "method": "clip", "dataset": "voc21", "split": "train",
                        "view": "v", "weights": "x"})
    b = cache_dir_name({"backbone": "dinov2-b14", "method": "clip", "dataset": "voc21", "split": "train",
                        "view": "v", "weights": "y"})
    assert a.startswith("dinov2-b14__clip__voc21__train__v__") and a != b


def test_interruption_before_the_first_item_keeps_an_empty_resumable_cache(tmp_path) -> None:
    # an extraction killed (Ctrl-C, OOM) in its first batch closes the cache with no item: that must not raise
    # (it used to fail reshaping the empty index, masking the real error) and must resume from 0
    c = FeatureCache(str(tmp_path / "c"), {"k": 1}, FIELDS)
    assert c.open_for_write() == 0
    c.close()
    r = FeatureCache(str(tmp_path / "c"), {"k": 1}, FIELDS)
    assert len(r) == 0 and not r.complete
    assert r.open_for_write() == 0
    r.append(item(0))
    r.finish()
    assert len(FeatureCache(str(tmp_path / "c"), {"k": 1}, FIELDS)) == 1


def test_windowed_stacks_equal_the_full_stacks_cut_item_by_item(tmp_path) -> None:
    """``windows`` (the depth ``fast`` v4 step) reads item k's [rows_k, cols_k] only: the same values as the whole
    stack cut afterwards, channels first or not."""
    rng = np.random.default_rng(2)
    c = FeatureCache(str(tmp_path / "c"), {"k": 1}, {"patch": "float16", "depth": "float32"})
    c.open_for_write()
    patches = [rng.standard_normal((4, 6, 7)).astype(np.float16) for _ in range(5)]
    depths = [rng.random((6, 7)).astype(np.float32) for _ in range(5)]
    for p, d in zip(patches, depths):
        c.append({"patch": p, "depth": d})
    c.finish()
    idx = [3, 0, 4]
    wins = [(slice(0, 4), slice(2, 7)), (slice(2, 6), slice(0, 5)), (slice(1, 5), slice(1, 6))]
    cf = c.stack_channels_first(idx, "patch", wins)
    full = c.stack_channels_first(idx, "patch")
    assert cf.shape == (4, 3, 4, 5)
    for k, (ys, xs) in enumerate(wins):
        assert torch.equal(cf[:, k], full[:, k, ys, xs])
        assert torch.equal(cf[:, k], torch.from_numpy(patches[idx[k]][:, ys, xs].astype(np.float32)))
    d = c.stack(idx, "depth", torch.float32, wins)
    assert d.shape == (3, 4, 5)
    assert all(torch.equal(d[k], torch.from_numpy(depths[idx[k]][ys, xs])) for k, (ys, xs) in enumerate(wins))
    assert torch.equal(c.stack(idx, "depth"), torch.from_numpy(np.stack([depths[i] for i in idx])))  # no windows
    with pytest.raises(ValueError, match="2 windows for 3 items"):
        c.stack(idx, "depth", windows=wins[:2])
