"""Deterministic sampling and augmentation, the toolbox transforms, centre padding and sliding windows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.probes.data import (
    AugmentedSamples,
    EpochOrder,
    IterationBatches,
    random_windows,
    register_transforms,
    sample_seed,
    seg_train_pipeline,
    window_size,
)
from harness.probes.features import center_pad, padded_grid, slide_windows
from harness.registry import DATASETS
from harness.synthetic.segmentation import write_synthetic_dataset

AUG = dict(scale=(2048, 64), ratio_range=(0.5, 2.0), crop_size=(56, 56), cat_max_ratio=0.75, flip_prob=0.5)
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def test_epoch_order_visits_every_image_once_per_epoch() -> None:
    order = EpochOrder(7, seed=3)
    for epoch in range(3):
        seen = sorted(order.index(epoch * 7 + p) for p in range(7))
        assert seen == list(range(7))
    assert [order.index(p) for p in range(7)] != [order.index(7 + p) for p in range(7)]


def test_batches_from_a_resume_point_are_the_tail_of_the_full_run() -> None:
    full = list(IterationBatches(10, 4, 0, 9, seed=1))
    tail = list(IterationBatches(10, 4, 5, 9, seed=1))
    assert full[5:] == tail and len(full) == 9
    assert sample_seed(1, 5, 2) == sample_seed(1, 5, 2) != sample_seed(1, 5, 3)


def test_random_windows_are_a_function_of_seed_iteration_and_slot_and_cover_the_grid() -> None:
    """The depth ``fast`` v4 windows: the share of each side (rounded), inside the grid, the same for a global
    batch drawn whole or as two ranks' halves, another draw per iteration, and every offset reachable."""
    assert window_size((30, 39), (0.7, 0.7)) == (21, 27) and window_size((8, 10), (0.7, 0.7)) == (6, 7)
    assert window_size((30, 39), (1.0, 1.0)) == (30, 39) and window_size((3, 3), (0.01, 0.2)) == (1, 1)
    batches = list(IterationBatches(40, 4, 0, 200, seed=5))
    starts = set()
    for items in batches:
        wins = random_windows((8, 10), (0.7, 0.7), 5, items)
        halves = random_windows((8, 10), (0.7, 0.7), 5, items[:2]) + random_windows((8, 10), (0.7, 0.7), 5, items[2:])
        assert wins == halves
        for ys, xs in wins:
            assert (ys.stop - ys.start, xs.stop - xs.start) == (6, 7) and 0 <= ys.start and ys.stop <= 8
            assert 0 <= xs.start and xs.stop <= 10
            starts.add((ys.start, xs.start))
    assert starts == {(y, x) for y in range(3) for x in range(4)}  # uniform over the 3 x 4 placements
    assert random_windows((8, 10), (0.7, 0.7), 5, batches[0]) != random_windows((8, 10), (0.7, 0.7), 5, batches[1])
    assert random_windows((8, 10), (0.7, 0.7), 6, batches[0]) != random_windows((8, 10), (0.7, 0.7), 5, batches[0])


@pytest.fixture(scope="module")
def voc_train(tmp_path_factory):
    root = write_synthetic_dataset("voc21", str(tmp_path_factory.mktemp("voc")), num_images=4, size=(60, 80),
                                   split="train")
    register_transforms()
    return DATASETS.get("voc21").build(root, "train", seg_train_pipeline(AUG))


def test_augmented_samples_are_a_function_of_seed_iteration_and_slot(voc_train) -> None:
    a = AugmentedSamples(voc_train, 0, MEAN, STD, "seg", pad_to=(56, 56))
    b = AugmentedSamples(voc_train, 0, MEAN, STD, "seg", pad_to=(56, 56))
    np.random.seed(999)  # global state before the call must not matter
    x = a[(3, 1, 2)]
    _ = b[(0, 0, 1)]
    y = b[(3, 1, 2)]
    assert x["img"].shape == (3, 56, 56) and x["target"].shape == (56, 56) and x["target"].dtype == torch.int64
    assert torch.equal(x["img"], y["img"]) and torch.equal(x["target"], y["target"])
    z = a[(4, 1, 2)]
    assert not torch.equal(x["img"], z["img"])  # another iteration: another random resize/crop/flip/colour


def test_toolbox_transforms() -> None:
    register_transforms()
    from mmseg.registry import TRANSFORMS

    img = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3)).astype(np.uint8)
    depth = np.random.default_rng(1).uniform(0.5, 9, size=(480, 640)).astype(np.float32)
    out = TRANSFORMS.build(dict(type="HarnessNYUCrop"))(
        {"img": img.copy(), "gt_depth_map": depth.copy(), "seg_fields": ["gt_depth_map"]})
    assert out["img"].shape == (427, 565, 3) and out["gt_depth_map"].shape == (427, 565)
    np.testing.assert_array_equal(out["gt_depth_map"], depth[45:472, 43:608])
    aug = TRANSFORMS.build(dict(type="HarnessDepthColorAug", prob=1.0, gamma_range=[0.9, 1.1],
                                brightness_range=[0.75, 1.25], color_range=[0.9, 1.1]))
    np.random.seed(5)
    got = aug({"img": img.copy()})["img"]
    np.random.seed(5)
    np.random.rand()
    gamma, bright = np.random.uniform(0.9, 1.1), np.random.uniform(0.75, 1.25)
    colors = np.random.uniform(0.9, 1.1, size=3)
    expected = np.clip(img.astype(np.float64) ** gamma * bright * colors, 0, 255)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_center_padding_as_dinov2() -> None:
    x = torch.ones(1, 3, 512, 500)
    y = center_pad(x, 14)
    assert y.shape[-2:] == (518, 504)
    assert y[0, 0, :3].sum() == 0 and y[0, 0, 3:515, 2:502].min() == 1 and y[0, 0, 515:].sum() == 0
    assert padded_grid((512, 512), 14) == (37, 37) and padded_grid((512, 512), 16) == (32, 32)
    assert center_pad(torch.ones(1, 3, 28, 42), 14).shape[-2:] == (28, 42)


def test_slide_windows_follow_mmseg() -> None:
    # a 683 x 512 image (VOC 500 x 375 at short side 512): 2 rows x 1 column, the last row moved inwards
    assert slide_windows(683, 512, (512, 512), (341, 341)) == [(0, 512, 0, 512), (171, 683, 0, 512)]
    assert slide_windows(300, 400, (512, 512), (341, 341)) == [(0, 300, 0, 400)]
    boxes = slide_windows(1024, 2048, (512, 512), (341, 341))
    assert len(boxes) == 3 * 6 and boxes[-1] == (512, 1024, 1536, 2048)
