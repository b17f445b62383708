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
