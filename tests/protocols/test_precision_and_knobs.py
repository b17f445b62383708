"""The protocol's ``precision`` is honoured and recorded; the loss and head constants come from the protocol.

* precision: fp32 runs as is; bf16 runs the backbone under ``torch.autocast(bfloat16)`` on any device
  (CPU here). A tiny OVSS run under bf16 records ``bf16`` and lands close to the fp32 run; bf16 probe
  features are fp32 tensors close to, but not equal to, the fp32 ones (so the autocast really acted).
* depth ``loss`` and ``head`` entries, linear-seg ``head``: checked against formulas re-implemented here
  in numpy with non-default values, so a knob the code ignored would fail.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from harness.cli import main
from harness.probes.features import dense_features
from harness.probes.heads import DepthBinsHead, LinearSegHead
from harness.probes.losses import depth_loss
from harness.protocols import get_protocol
from harness.results.record import load_records
from harness.runtime import precision_context


def test_precision_context_autocasts_only_for_bf16():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with precision_context("fp32", torch.device("cpu")):
        assert (a @ b).dtype == torch.float32
    with precision_context("bf16", torch.device("cpu")):
        out = a @ b
    assert out.dtype == torch.bfloat16
    ref = a.to(torch.bfloat16).float() @ b.to(torch.bfloat16).float()  # bf16 inputs, fp32 accumulation
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.fixture(scope="module")
def planted():
    from harness.models import build_dense_model

    return build_dense_model("test-planted-clip", "vanilla", random_init=True).eval()


def test_bf16_probe_features_are_fp32_and_close(planted):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 80)
    f32 = dense_features(planted, x, "fp32")
    b16 = dense_features(planted, x, "bf16")
    assert b16.patch.dtype == torch.float32 and b16.cls.dtype == torch.float32
    assert not torch.equal(f32.patch, b16.patch)  # the autocast acted
    rel = (b16.patch - f32.patch).norm() / f32.patch.norm()
    assert rel < 0.05, rel.item()


OVSS_PROTOCOL = {
    "id": "test-precision", "version": 1, "task": "ovss", "description": "tiny CPU protocol", "source": "tests",
    "defaults": {"mode": "slide", "crop": 48, "stride": 32, "max_long_side": 2048, "resize": 64, "logit_scale": 40,
                 "prob_thd": 0.0, "area_thd": None, "pamr": None, "name_set": "sclip", "templates": "test_one"},
    "datasets": {"voc21": {}},
}


def _ovss_run(tmp_path, root: str, precision: str):
    proto = dict(OVSS_PROTOCOL, defaults={**OVSS_PROTOCOL["defaults"], "precision": precision})
    path = tmp_path / f"proto-{precision}.yaml"
    path.write_text(yaml.safe_dump(proto))
    results = tmp_path / f"results-{precision}"
    rc = main(["run", "ovss", "--backbone", "test-planted-clip", "--method", "vanilla", "--dataset", "voc21",
               "--data-root", root, "--random-init", "--protocol", str(path), "--workers", "0",
               "--results-dir", str(results), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    (rec,) = load_records(str(results))
    return rec


def test_ovss_bf16_run_is_recorded_and_close_to_fp32(tmp_path, monkeypatch):
    from harness.synthetic.segmentation import write_synthetic_dataset
    from harness.text import templates

    monkeypatch.setitem(templates.TEMPLATE_SETS, "test_one", ["a photo of a {}."])
    root = write_synthetic_dataset("voc21", str(tmp_path / "data"), num_images=2, size=(60, 80), seed=3)
    r32 = _ovss_run(tmp_path, root, "fp32")
    r16 = _ovss_run(tmp_path, root, "bf16")
    assert r32.settings["precision"] == "fp32" and r16.settings["precision"] == "bf16"
    for k in ("mIoU", "mAcc", "aAcc"):  # percent; a random tiny model: a few flipped pixels at most
        assert abs(r16.metrics[k] - r32.metrics[k]) < 5.0, (k, r32.metrics[k], r16.metrics[k])


# -- loss and head knobs -----------------------------------------------------------------------------


def _np_sig(pred, gt, eps, w, warm):
    m = gt > 0
    g = np.log(pred[m] + eps) - np.log(gt[m] + eps)
    if warm:
        return math.sqrt(w * g.mean() ** 2)
    return math.sqrt(g.var(ddof=1) + w * g.mean() ** 2)


def _np_grad(pred, gt, eps, strides):
    total = 0.0
    for s in strides:
        p, d = pred[..., ::s, ::s], gt[..., ::s, ::s]
        m = (d > 0).astype(np.float64)
        r = (np.log(p + eps) - np.log(np.where(d > 0, d, 1.0) + eps)) * m
        v = np.abs(r[..., :-2, :] - r[..., 2:, :]) * m[..., :-2, :] * m[..., 2:, :]
        h = np.abs(r[..., :, :-2] - r[..., :, 2:]) * m[..., :, :-2] * m[..., :, 2:]
        total += (v.sum() + h.sum()) / max(m.sum(), 1)
    return total


@pytest.mark.parametrize("iteration", [3, 500])
def test_depth_loss_reads_every_protocol_loss_key(iteration):
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 5.0, size=(2, 1, 9, 11))
    gt[0, 0, 2, 3] = 0.0  # an invalid pixel
    pred = gt * np.exp(rng.normal(0, 0.2, size=gt.shape))
    loss = {"sigloss_weight": 0.7, "sigloss_mean_weight": 0.3, "gradient_weight": 2.0, "gradient_strides": [1, 3],
            "log_eps": 0.01}
    ours = depth_loss(torch.from_numpy(pred), torch.from_numpy(gt), iteration, warm_iters=100, **loss).item()
    ref = 0.7 * _np_sig(pred, gt, 0.01, 0.3, iteration < 100) + 2.0 * _np_grad(pred, gt, 0.01, [1, 3])
    assert ours == pytest.approx(ref, rel=1e-9)


def test_shipped_depth_loss_is_dvts():
    s = get_protocol("depth", "faithful").settings("nyu")
    assert s["loss"] == {"sigloss_weight": 1.0, "sigloss_mean_weight": 0.15, "gradient_weight": 0.5,
                         "gradient_strides": [1, 2, 4, 6], "log_eps": 1e-3}
    assert s["head"] == {"norm_eps": 0.1} and s["precision"] == "fp32"
    assert get_protocol("linear-seg", "faithful").settings("voc21")["head"] == {"conv_init_std": 0.01}


def test_depth_head_norm_eps_by_hand():
    torch.manual_seed(0)
    head = DepthBinsHead(4, n_bins=3, min_depth=1.0, max_depth=3.0, upsample=1, norm_eps=0.5)
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    head = head.double()
    w = head.conv_depth.weight[:, :, 0, 0].detach().numpy()
    b = head.conv_depth.bias.detach().numpy()
    z = np.einsum("kc,chw->khw", w, x[0].numpy()) + b[:, None, None]
    p = np.maximum(z, 0) + 0.5
    p = p / p.sum(0, keepdims=True)
    expected = np.einsum("khw,k->hw", p, np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(head(x)[0, 0].detach().numpy(), expected, rtol=1e-12)


def test_seg_head_init_std_is_the_protocols():
    torch.manual_seed(0)
    head = LinearSegHead(256, 64, conv_init_std=0.2)
    assert head.conv_seg.weight.std().item() == pytest.approx(0.2, rel=0.05)
    assert torch.count_nonzero(head.conv_seg.bias) == 0
