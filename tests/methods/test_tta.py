"""PH-Reg's TTA denoiser: the view plan, the shift/flip/unshift mapping by hand, identity with one view,
and its effect on the planted artifact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.backbones.base import DenseFeatures
from harness.backbones.planted import low_information_images
from harness.errors import ConfigError
from harness.methods.tta import apply_view, source_positions, view_plan
from harness.models import attach_method, build_dense_model


@pytest.fixture(scope="module")
def planted():
    return build_dense_model("test-planted-clip", "vanilla", random_init=True)


def test_view_plan_follows_the_authors_draw() -> None:
    views = view_plan((28, 28), 10, seed=3)
    assert len(views) == 10 and views[0] == (0, 0, False)
    s = round(0.15 * 28)  # 4 patches for CLIP at 448 (PH-Reg: s = round(0.15 n))
    assert all(abs(dy) <= s and abs(dx) <= s for dy, dx, _ in views)
    assert len({(dy, dx) for dy, dx, _ in views[1:]}) == 9  # farthest points are distinct
    assert view_plan((28, 28), 10, seed=3) == views and view_plan((28, 28), 10, seed=4) != views
    assert view_plan((37, 37), 10, seed=0)[0] == (0, 0, False) and round(0.15 * 37) == 6


def test_shift_flip_unshift_by_hand_on_a_4x5_grid() -> None:
    """View (dy=1, dx=-2, flip): view pixel (y, x) shows source (y + 1p, x - 2p), then the view is flipped.

    Worked by hand for the 4 x 5 grid (row-major source index r*5 + c, -1 = not visible):
    before the flip, view patch (r, c) shows source (r + 1, c - 2): valid for r <= 2 and c >= 2;
    after the flip, view column c holds what was at column 4 - c, i.e. source column 2 - c.
    """
    expected = np.array([
        [7, 6, 5, -1, -1],
        [12, 11, 10, -1, -1],
        [17, 16, 15, -1, -1],
        [-1, -1, -1, -1, -1],
    ])
    src, valid = source_positions((4, 5), (1, -2, True))
    got = torch.where(valid, src, torch.full_like(src, -1)).view(4, 5).numpy()
    np.testing.assert_array_equal(got, expected)

    # and the pixels agree with the index map: encode each source patch's index in its pixels
    p = 2
    idx = torch.arange(20, dtype=torch.float32).view(1, 1, 4, 5)
    img = idx.repeat_interleave(p, 2).repeat_interleave(p, 3).expand(1, 3, 8, 10)
    fill = torch.full((3,), -1.0)
    view = apply_view(img, (1, -2, True), p, fill)[0, 0, ::p, ::p]
    np.testing.assert_array_equal(view.numpy(), expected)


def test_averaging_maps_every_view_back_to_its_source() -> None:
    """With a 'backbone' whose feature at a patch is the pixel value there, TTA returns the image itself."""
    tta = attach_method(build_dense_model("test-planted-clip", "vanilla", random_init=True).backbone, "tta",
                        {"views": 6, "seed": 1}).parts[0]
    p = 16
    idx = torch.arange(20, dtype=torch.float32).view(1, 1, 4, 5) + 10.0
    img = idx.repeat_interleave(p, 2).repeat_interleave(p, 3).expand(2, 3, 64, 80).contiguous()
    white = float(((1 - torch.tensor(tta._spec.mean)) / torch.tensor(tta._spec.std))[0])

    def forward(x: torch.Tensor) -> DenseFeatures:
        patch = x[:, :1, ::p, ::p]
        assert not torch.isclose(patch, torch.tensor(white)).all()
        return DenseFeatures(patch=patch, cls=x[:, :1, 0, 0], registers=x.new_zeros(x.shape[0], 0, 1))

    out = tta.wrap(forward, img)
    torch.testing.assert_close(out.patch, idx.expand(2, 1, 4, 5))


def test_one_view_returns_exactly_the_raw_features(planted) -> None:
    x = low_information_images(2, (224, 320), seed=0)
    tta = attach_method(planted.backbone, "tta", {"views": 1})
    with torch.no_grad():
        a, b = tta.forward_dense(x), planted.forward_dense(x)
    assert torch.equal(a.patch, b.patch) and torch.equal(a.cls, b.cls)


def test_tta_lowers_the_planted_outlier_share(planted) -> None:
    x = low_information_images(4, (224, 224), seed=1)
    tta = attach_method(planted.backbone, "tta")
    with torch.no_grad():
        raw, clean = planted.forward_dense(x).patch, tta.forward_dense(x).patch

    def share(p: torch.Tensor) -> float:
        n = p.norm(dim=1).flatten(1)
        return float((n > 3 * n.median(dim=1, keepdim=True).values).float().mean())

    print(f"outlier share {share(raw):.3f} -> {share(clean):.3f}")
    assert share(clean) < 0.5 * share(raw)


def test_batch_equals_images_one_at_a_time(planted) -> None:
    x = low_information_images(2, (224, 224), seed=2)
    tta = attach_method(planted.backbone, "naclip+tta", {"views": 4})
    with torch.no_grad():
        both = tta.forward_dense(x).patch
        one = torch.cat([tta.forward_dense(x[i:i + 1]).patch for i in range(2)])
    assert (both - one).abs().max() < 1e-5


def test_views_must_be_positive(planted) -> None:
    with pytest.raises(ConfigError, match="views must be >= 1"):
        attach_method(planted.backbone, "tta", {"views": 0})
