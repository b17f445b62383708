"""Sliding window, post-processing and PAMR against hand-computed cases and independent loops."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.methods.pamr import pamr
from harness.ovss.inference import ImageJob, dense_logits, postprocess, slide_windows


def test_slide_windows_mmseg_grid():
    # 448 x 597, crop 336, stride 112: h_grids = (448-336+111)//112+1 = 2, w_grids = (597-336+111)//112+1 = 4
    wins = slide_windows(448, 597, 336, 112)
    assert len(wins) == 8
    assert wins[0] == (0, 336, 0, 336)
    assert wins[3] == (0, 336, 261, 597)  # last window aligned to the right border
    assert wins[-1] == (112, 448, 261, 597)
    # image smaller than the crop: one window covering it
    assert slide_windows(200, 150, 336, 112) == [(0, 200, 0, 150)]


class _Toy(torch.nn.Module):
    """A 'model' whose patch features are average-pooled pixels (patch 16), enough to test the loops."""

    def forward_dense(self, x):
        class F_:  # noqa: N801
            patch = F.avg_pool2d(x, 16)

        return F_


def _naive_slide(model, img, text, crop, stride, ori):
    """One window at a time, SCLIP forward_slide style (pad-and-add)."""
    q = text.shape[0]
    h, w = img.shape[-2:]
    preds = torch.zeros(1, q, h, w)
    count = torch.zeros(1, 1, h, w)
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        c = img[None, :, y1:y2, x1:x2]
        f = model.forward_dense(c).patch
        f = f / f.norm(dim=1, keepdim=True)
        lg = torch.einsum("nchw,qc->nqhw", f, text)
        lg = F.interpolate(lg, size=c.shape[-2:], mode="bilinear", align_corners=False)
        preds += F.pad(lg, (x1, w - x2, y1, h - y2))
        count[:, :, y1:y2, x1:x2] += 1
    return F.interpolate(preds / count, size=ori, mode="bilinear", align_corners=False)[0]


def test_batched_slide_equals_naive_loop():
    torch.manual_seed(0)
    model = _Toy()
    text = F.normalize(torch.randn(5, 3), dim=-1)
    imgs = [torch.randn(3, 96, 160), torch.randn(3, 96, 130), torch.randn(3, 64, 64)]
    oris = [(120, 200), (50, 70), (64, 64)]
    jobs = [ImageJob(i, o) for i, o in zip(imgs, oris)]
    ours = dense_logits(lambda x: [model.forward_dense(x).patch], jobs, text, "slide", crop=64, stride=32,
                        batch_size=3)[0]
    for got, img, ori in zip(ours, imgs, oris):
        ref = _naive_slide(model, img, text, 64, 32, ori)
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, atol=1e-5)


def test_whole_mode_upsamples_grid_to_original_size():
    model = _Toy()
    text = F.normalize(torch.randn(2, 3), dim=-1)
    img = torch.randn(3, 64, 96)
    out = dense_logits(lambda x: [model.forward_dense(x).patch], [ImageJob(img, (30, 50))], text, "whole", 0, 0,
                       4)[0][0]
    f = F.normalize(F.avg_pool2d(img[None], 16), dim=1)
    ref = F.interpolate(torch.einsum("nchw,qc->nqhw", f, text), size=(30, 50), mode="bilinear", align_corners=False)
    assert torch.allclose(out, ref[0], atol=1e-6)


def test_shared_trunk_equals_separate_forwards():
    """Several methods on one backbone: trunk computed once, same features as each model alone."""
    from harness.models import attach_method, build_dense_model
    from harness.ovss.inference import shared_trunk_features

    base = build_dense_model("clip-b16-openai", "clip", random_init=True)
    models = [base] + [attach_method(base.backbone, m) for m in ("maskclip", "naclip")]
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        shared = shared_trunk_features(models)(x)
        for m, f in zip(models, shared):
            assert torch.allclose(f, m.forward_dense(x).patch, atol=1e-5)


def test_postprocess_hand_computed():
    # 3 classes; class 1 has two names (queries 1 and 2); 1x3 image
    cos = torch.tensor([[0.30, 0.10, 0.10],   # q0 -> class 0 (background)
                        [0.10, 0.30, 0.12],   # q1 -> class 1
                        [0.10, 0.10, 0.35],   # q2 -> class 1 (alias)
                        [0.00, 0.00, 0.10]])  # q3 -> class 2
    cos = cos.view(4, 1, 3)
    owner = torch.tensor([0, 1, 1, 2])
    pred = postprocess(cos, owner, 3, logit_scale=40.0)
    assert pred.view(-1).tolist() == [0, 1, 1]
    # max probabilities by hand: pixels 0 and 1: 1/(1+2e^-8+e^-12) = 0.99933; pixel 2: 1/(1+2e^-10+e^-9.2) = 0.99981
    assert postprocess(cos, owner, 3, 40.0, prob_thd=0.9995).view(-1).tolist() == [0, 0, 1]
    assert postprocess(cos, owner, 3, 40.0, prob_thd=0.9999).view(-1).tolist() == [0, 0, 0]
    # hand-computed probabilities
    p = torch.softmax(cos * 40.0, 0)
    cls1 = torch.maximum(p[1], p[2])
    assert torch.allclose(torch.stack([p[0], cls1, p[3]]).argmax(0), pred)


def test_area_threshold_drops_small_classes():
    # 10 pixels: class 1 wins 9, class 2 wins 1 -> with area_thd 0.2 class 2 (1/10 of non-bg area) is zeroed
    cos = torch.zeros(3, 1, 10)
    cos[1, 0, :9] = 1.0
    cos[2, 0, 9] = 1.0
    owner = torch.arange(3)
    assert postprocess(cos, owner, 3, 40.0).view(-1).tolist() == [1] * 9 + [2]
    out = postprocess(cos, owner, 3, 40.0, area_thd=0.2).view(-1).tolist()
    assert out[:9] == [1] * 9 and out[9] != 2


def _pamr_reference(img, mask, num_iter, dilations):
    """PAMR written with dilated 3x3 convolutions (the original LocalAffinity formulation)."""
    def shift_kernels(with_centre):
        ks = []
        for i in range(3):
            for j in range(3):
                if (i, j) == (1, 1) and not with_centre:
                    continue
                k = torch.zeros(1, 1, 3, 3)
                k[0, 0, i, j] = 1
                ks.append(k)
        return torch.cat(ks)

    def local(x, with_centre, subtract_centre=False):
        b, k, h, w = x.shape
        outs = []
        for d in dilations:
            xp = F.pad(x.reshape(b * k, 1, h, w), [d] * 4, mode="replicate")
            weight = shift_kernels(with_centre)
            if subtract_centre:
                weight = weight.clone()
                weight[:, 0, 1, 1] -= 1
            outs.append(F.conv2d(xp, weight, dilation=d).view(b, k, -1, h, w))
        return torch.cat(outs, 2)

    std = local(img, True).std(2, keepdim=True)
    aff = -local(img, False, subtract_centre=True).abs() / (1e-8 + 0.1 * std)
    aff = F.softmax(aff.mean(1, keepdim=True), 2)
    for _ in range(num_iter):
        mask = (local(mask, False) * aff).sum(2)
    return mask


def test_pamr_matches_convolution_reference():
    torch.manual_seed(0)
    img = torch.randn(1, 3, 40, 52)
    mask = torch.randn(1, 4, 40, 52)
    ours = pamr(img, mask, num_iter=3, dilations=(2, 4))
    ref = _pamr_reference(img, mask, 3, (2, 4))
    assert torch.allclose(ours, ref, atol=1e-5)
    assert not torch.allclose(ours, mask)
