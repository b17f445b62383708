"""UniRefiner's losses, lazy-channel mask and AH-layer option against values worked out by hand or in numpy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.distill import unirefiner_channels as channels
from harness.distill import unirefiner_losses as L
from harness.distill.unirefiner import default_ah_layers, parse_ah_layers
from harness.errors import ConfigError

T = torch.tensor


def test_refinement_loss_hand_case() -> None:
    """s = t = e1, negatives {e1, e2}, image token e1 vs ring e2: L_ref = log(1 + e^-5) (tau 0.2, lambda 1)."""
    s = T([[[1.0, 0.0]]])
    f = T([[[1.0, 0.0], [0.0, 1.0]]])
    loss, theta = L.refinement_loss(s, s.clone(), T([[True]]), f, T([[[1.0, 0.0]]]), T([[[0.0, 1.0]]]), 1.0)
    assert float(theta) == pytest.approx(1.0)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-5)), rel=1e-5)


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_refinement_loss_matches_numpy_loops() -> None:
    rng = np.random.default_rng(0)
    p, n, m, r, d, lam, tau = 2, 3, 4, 2, 3, 0.3, 0.2
    s, t, f = _unit(rng, p, n, d), _unit(rng, p, n, d), _unit(rng, p, m, d)
    z, g = _unit(rng, p, n, d), _unit(rng, p, r, d)
    clean = np.array([[True, False, True], [False, True, True]])
    valid_t = [t[a, i] for a in range(p) for i in range(n) if clean[a, i]]
    theta = np.mean([valid_t[i] @ valid_t[len(valid_t) - 1 - i] for i in range(len(valid_t))])
    terms = [s[a, i] @ t[a, i] / tau - lam * np.log(sum(np.exp(s[a, i] @ f[a, j] / tau) for j in range(m)))
             for a in range(p) for i in range(n) if clean[a, i]]
    ring = np.mean([np.log(sum(np.exp(z[a, j] @ g[a, k] / tau) for k in range(r))) for a in range(p) for j in range(n)])
    expected = -np.mean(terms) + ring
    got, th = L.refinement_loss(*(torch.tensor(x, dtype=torch.float64) for x in (s, t)), torch.tensor(clean),
                                torch.tensor(f), torch.tensor(z), torch.tensor(g), lam, tau)
    assert float(th) == pytest.approx(theta, rel=1e-9)
    assert float(got) == pytest.approx(expected, rel=1e-9)
    # no clean token at all: every token is supervised (valid_clean_tokens_or_all)
    none, _ = L.refinement_loss(torch.tensor(s), torch.tensor(t), torch.zeros(p, n, dtype=torch.bool), torch.tensor(f),
                                torch.tensor(z), torch.tensor(g), lam, tau)
    full, _ = L.refinement_loss(torch.tensor(s), torch.tensor(t), torch.ones(p, n, dtype=torch.bool), torch.tensor(f),
                                torch.tensor(z), torch.tensor(g), lam, tau)
    assert float(none) == pytest.approx(float(full))


def test_ring_term_stops_gradient_below_055() -> None:
    """Image tokens already far from the ring (cos < 0.55) get no push; close ones do."""
    s = T([[[1.0, 0.0]]])
    g = T([[[0.0, 1.0]]])
    for z0, moves in (([1.0, 0.0], False), ([0.6, 0.8], True)):
        z = T([[z0]], requires_grad=True)
        loss, _ = L.refinement_loss(s, s, T([[True]]), s, z, g, 1.0)
        loss.backward()
        assert bool(z.grad.abs().sum() > 0) == moves


def test_absorption_loss_hand_case() -> None:
    """g = {e1, e2}, targets {e1, (.6,.8)}, crop (.6,.8), theta .5 (values worked out in the comments)."""
    g = T([[[1.0, 0.0], [0.0, 1.0]]])
    v = T([[[1.0, 0.0], [0.6, 0.8]]])
    s = T([[[0.6, 0.8]]])
    # alignment: maxima 1 and .8 -> -0.9 / 0.2 = -4.5; crop: top 1 of {.6, .8} = .8 > .5 -> -0.2 * .8 / .2 = -0.8
    # spread: sims [[1, .6], [0, .8]], below .5 -> .6: mean(log(e^5 + e^3), log(e^3 + e^4))
    spread = (math.log(math.exp(5) + math.exp(3)) + math.log(math.exp(3) + math.exp(4))) / 2
    got = L.absorption_loss(g, s, v, T(0.5))
    assert float(got) == pytest.approx(-4.5 - 0.8 + spread, rel=1e-6)
    # crop affinities all below theta: that term vanishes
    assert float(L.absorption_loss(g, s, v, T(0.95))) == pytest.approx(-4.5 + (
        math.log(math.exp(5) + math.exp(1.05 / 0.2)) + math.log(2 * math.exp(1.05 / 0.2))) / 2, rel=1e-6)


def test_scd_loss_hand_case() -> None:
    """Target rows constant -> uniform q; student I -> p = softmax([5, 0]): loss = log(e^5 + 1) - 2.5."""
    s = T([[[1.0, 0.0], [0.0, 1.0]]])
    e = T([[[1.0, 0.0], [1.0, 0.0]]])
    assert float(L.scd_loss(s, e)) == pytest.approx(math.log(math.exp(5) + 1) - 2.5, rel=1e-6)
    # equal relations: the loss is the entropy of softmax([5, 0])
    p1 = math.exp(5) / (math.exp(5) + 1)
    assert float(L.scd_loss(s, s)) == pytest.approx(-(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1)), rel=1e-5)


def test_snap_and_total() -> None:
    pool = T([[[1.0, 0.0], [0.0, 1.0]]])
    assert torch.equal(L.snap(T([[[0.9, 0.1], [0.2, 0.8]]]), pool), pool)
    one = T(1.0)
    assert float(L.total_loss(one, one, one, 0.05)) == pytest.approx(1.1)
    assert float(L.total_loss(one, one, one, 0.5)) == pytest.approx(1.5)


def test_lazy_channel_selection_against_numpy() -> None:
    """A large constant channel makes unrelated tokens look alike: it is masked first, and the mean unrelated
    cosine after masking is the one numpy computes by renormalising the remaining channels."""
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(4, 6, 8))
    bank[..., 3] += 10.0
    pair = bank[::-1, ::-1]

    def unrelated(x: np.ndarray, y: np.ndarray) -> float:
        xn, yn = x / np.linalg.norm(x, axis=-1, keepdims=True), y / np.linalg.norm(y, axis=-1, keepdims=True)
        return float((xn * yn).sum(-1).mean())

    before = unrelated(bank, pair)
    kept = np.delete(bank, 3, axis=-1)
    after = unrelated(kept, kept[::-1, ::-1])
    assert before > 0.9 and after < 0.2
    out = channels.select_lazy_channels(torch.tensor(bank, dtype=torch.float32))
    assert out["masked_channels"] == [3] and out["stop_reason"] == "threshold"
    assert out["final_unrelated_mean"] == pytest.approx(after, abs=1e-4)
    masked = channels.apply_mask(torch.ones(2, 8), [3])
    assert float(masked[:, 3].abs().sum()) == 0.0 and float(masked.sum()) == 14.0


def test_ah_layers_option() -> None:
    assert default_ah_layers(12) == (5, 7) and default_ah_layers(24) == (9, 13) and default_ah_layers(4) == (2, 2)
    assert parse_ah_layers(None, 12) == (5, 7) and parse_ah_layers("off", 12) is None
    assert parse_ah_layers("3-4", 12) == (3, 4)
    with pytest.raises(ConfigError, match=r"--ah-layers '9-12'.*END < 12"):
        parse_ah_layers("9-12", 12)
    with pytest.raises(ConfigError, match="START-END"):
        parse_ah_layers("five", 12)
