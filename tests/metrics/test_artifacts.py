"""Artifact measures against hand-computed cases and numpy re-computations."""
import numpy as np
import torch

from harness.metrics.artifacts import (
    dissimilarity_percentiles,
    modified_z,
    norm_outliers,
    norm_spread,
    outlier_share,
    patch_norms,
    pearson_with_onehot,
    token_cosine,
)


def test_modified_z_hand_case():
    # median 3, |x - 3| = 2,1,0,1,97 -> MAD 1; z = 0.6745 * (x - 3)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    z = modified_z(x)
    assert torch.allclose(z, 0.6745 * (x.double() - 3.0))
    m = norm_outliers(x)
    assert m["high"].tolist() == [[False, False, False, False, True]]
    assert not m["low"].any()


def test_low_norm_outliers_are_counted():
    x = torch.tensor([[10.0, 10.5, 9.5, 10.2, 9.8, 0.1, 10.1, 9.9]])
    share = outlier_share(x)
    assert share == {"high": 0.0, "low": 1 / 8}


def test_constant_norms_have_no_outliers():
    assert outlier_share(torch.ones(2, 9)) == {"high": 0.0, "low": 0.0}


def test_norm_spread_matches_numpy():
    x = torch.rand(3, 50) + 0.5
    ref = x.numpy().std(axis=1) / x.numpy().mean(axis=1)
    assert np.allclose(norm_spread(x).numpy(), ref)


def test_patch_norms_and_cosine():
    f = torch.randn(2, 8, 3, 4)
    assert torch.allclose(patch_norms(f), f.permute(0, 2, 3, 1).reshape(2, 12, 8).norm(dim=-1))
    assert torch.allclose(token_cosine(f, 3 * f), torch.ones(2, 12, dtype=torch.float64))
    assert torch.allclose(token_cosine(f, -f), -torch.ones(2, 12, dtype=torch.float64))


def test_dissimilarity_percentiles_read_the_low_tail():
    c = torch.linspace(0, 1, 101, dtype=torch.float64)  # 0.00, 0.01, ..., 1.00
    out = dissimilarity_percentiles([c[:50], c[50:]])
    assert abs(out[99] - 0.01) < 1e-9 and abs(out[50] - 0.50) < 1e-9 and abs(out[90] - 0.10) < 1e-9


def test_pearson_matches_numpy_and_skips_constant_and_ignored():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, size=(6, 7))
    label[0, :3] = 255
    scores = rng.normal(size=(4, 6, 7))
    v = label != 255
    ref = np.mean([np.corrcoef(scores[c][v], (label[v] == c).astype(float))[0, 1] for c in range(3)])
    got = pearson_with_onehot(torch.from_numpy(scores), torch.from_numpy(label))
    assert abs(got - ref) < 1e-12
    # a map identical to the one-hot mask correlates perfectly; class 3 is absent and not averaged
    perfect = torch.stack([torch.from_numpy((label == c).astype(float)) for c in range(4)])
    assert abs(pearson_with_onehot(perfect, torch.from_numpy(label)) - 1.0) < 1e-12
    assert pearson_with_onehot(perfect, torch.full((6, 7), 255)) is None
