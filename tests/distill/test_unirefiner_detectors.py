"""UniRefiner's spurious-token detectors: hand cases of each rule, and precision/recall on the planted-artifact CLIP.

On ``test-planted-clip`` a token is *planted* when the register neuron fired on it (activation > 1 at block
``PLANTED_LAYER``, unit ``PLANTED_UNIT``), in the teacher's pass over the composite of an image and the
reference strip -- the tokens the detectors are meant to reject.
"""
from __future__ import annotations

import math
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

from harness.backbones.planted import CLIP_MEAN, CLIP_STD, PLANTED_LAYER, PLANTED_UNIT, low_information_images
from harness.distill import unirefiner as U
from harness.distill import unirefiner_crops as C
from harness.distill import unirefiner_detectors as D
from harness.distill.unirefiner_losses import snap
from harness.methods.unirefiner_hf import HFCLIPVision
from harness.models import build_dense_model

T = torch.tensor


def test_fp_gp_zscore_hand_case() -> None:
    """Scores .1, .2, .9: mean .4, sample std sqrt(.19); only .9 reaches mean + .5 std."""
    scores = T([[0.1, 0.2, 0.9]])
    fg2 = torch.stack([scores[0], (1 - scores[0] ** 2).sqrt()], -1).unsqueeze(0)
    clean2, s2 = D.fp_gp(fg2, T([[[1.0, 0.0]]]))
    torch.testing.assert_close(s2, scores)
    assert 0.4 + 0.5 * math.sqrt(0.19) == pytest.approx(0.6179, abs=1e-4)
    assert clean2.tolist() == [[True, True, False]]


def test_sampling_draws_from_the_top_share_only() -> None:
    tokens = torch.arange(10.0).view(1, 10, 1)
    score = torch.arange(10.0).view(1, 10)
    got = D.sample_spurious(tokens, score, 200, torch.Generator().manual_seed(0))
    assert set(got.flatten().tolist()) == {6.0, 7.0, 8.0, 9.0}  # top 40% of 10 tokens


def test_adaptive_and_hijackee_hand_cases() -> None:
    ring = T([[[1.0, 0.0]]])
    targets = T([[[1.0, 0.0], [0.6, 0.8], [0.5, math.sqrt(0.75)]]])
    assert D.adaptive_register(ring, targets).tolist() == [[False, False, True]]  # cos 1, .6 >= .55; .5 kept
    # two tokens, q = k = e1, e2: A = softmax([[1, 0], [0, 1]]) per row; column sums are 1 -> score 0 for both
    q = T([[[1.0, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(D.hijackee_score([(q, q)]), torch.zeros(1, 2))
    # token 1's key rejected (zeroed): row 0 softmax([1, 0]), row 1 softmax([0, 0]); token 0 receives
    # e/(e+1) + 1/2 -> score 1 - that; token 1 receives 1/(e+1) + 1/2
    e = math.e
    got = D.hijackee_score([(q, q)], T([[False, True]]))
    torch.testing.assert_close(got, T([[1 - e / (e + 1) - 0.5, 1 - 1 / (e + 1) - 0.5]]))


@pytest.fixture(scope="module")
def planted_detection() -> Dict[str, List[float]]:
    torch.manual_seed(0)
    bb = build_dense_model("test-planted-clip", random_init=True).backbone
    size, patch = 128, 16
    n = size // patch
    images = low_information_images(8, (size, size), seed=3)
    reference = C.reference_tensor(size, CLIP_MEAN, CLIP_STD)
    fired: Dict[str, torch.Tensor] = {}
    hook = bb.visual.transformer.resblocks[PLANTED_LAYER].mlp.gelu.register_forward_hook(
        lambda mod, inp, out: fired.__setitem__("a", out[..., PLANTED_UNIT]))
    gen = torch.Generator().manual_seed(0)
    tower = HFCLIPVision(bb.visual)
    first, last = U.default_ah_layers(bb.num_blocks)
    layers = list(range(first, last + 1))
    with torch.no_grad():
        u = F.normalize(U.teacher_tokens(bb, reference)[0], dim=-1)
        f = F.normalize(U.teacher_tokens(bb, images)[0], dim=-1)
        ring = F.normalize(U.student_tokens(tower, images, 1, "zero", None)[1], dim=-1)
        counts: Dict[str, List[float]] = {}
        for side in range(4):
            comp, fg_mask = C.compose(images, reference, patch, side)
            tok, qk = U.teacher_tokens(bb, comp, layers)
            truth = (fired["a"][:, 1:] > 1.0)[fg_mask].view(len(images), -1)
            tok = F.normalize(tok, dim=-1)
            b = len(images)
            fg = tok[fg_mask].view(b, n * n, -1)
            strip = tok[~fg_mask].view(b, -1, tok.shape[-1])
            qk = [(q[fg_mask].view(b, n * n, -1), k[fg_mask].view(b, n * n, -1)) for q, k in qk]
            det = D.detect(fg, strip, u, snap(fg, f), ring, qk, gen)
            _, score = D.fp_gp(fg, u)
            k = int(truth.sum())
            top = score.flatten().topk(k).indices
            for name, clean in det.masks().items():
                c = counts.setdefault(name, [0, 0, 0, 0])
                c[0] += int((~clean & truth).sum())
                c[1] += int((~clean).sum())
                c[2] += int(truth.sum())
            c = counts.setdefault("fp_gp_inter@k", [0, 0, 0, 0])
            c[0] += int(truth.flatten()[top].sum())
            c[1] += k
            c[2] += k
    hook.remove()
    return counts


def test_detectors_on_planted_tokens(planted_detection, capsys) -> None:
    rows = {}
    for name, (tp, flagged, planted, _) in planted_detection.items():
        rows[name] = (tp / max(flagged, 1), tp / max(planted, 1))
    with capsys.disabled():
        print("\nUniRefiner detectors on test-planted-clip (128 px, 8 images x 4 strip sides):")
        for name, (p, r) in rows.items():
            print(f"  {name:18s} precision {p:.2f}  recall {r:.2f}")
    # fixed pattern (FP-GP against the reference image): with the authors' threshold it rejects every planted
    # token; its score ranks them first (precision at k = number of planted tokens)
    assert rows["fp_gp_inter"][1] >= 0.8
    assert rows["fp_gp_inter@k"][0] >= 0.8


def _content_free_reference(path, size: int, patch: int) -> str:
    """A reference image that shares no low-level content with the test images except where the planted
    neuron can fire: pixel noise everywhere, flat colour on the patches of the planted positional gate.

    In a random network a token's similarity reflects low-level content, so a reference with flat areas
    elsewhere would match the images' flat (clean) patches as well as their artifacts.
    """
    from PIL import Image

    from harness.backbones.planted import planted_mask

    g = torch.Generator().manual_seed(5)
    img = torch.rand(3, size, size, generator=g)
    n = size // patch
    gate = planted_mask((n, n))
    for i in range(n):
        for j in range(n):
            if gate[i, j]:
                img[:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch] = torch.rand(3, 1, 1, generator=g)
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    return str(path)


def test_fixed_pattern_detector_finds_the_planted_tokens(tmp_path, capsys) -> None:
    """FP (inter-image) against a content-free reference (``--reference-image``): in the authors' fixed-cosine
    mode precision and recall on the planted tokens are >= 0.8; the recipes' z-score rule keeps its recall and
    rejects about a third of each crop, so its precision is bounded by the planted share (printed)."""
    torch.manual_seed(0)
    bb = build_dense_model("test-planted-clip", random_init=True).backbone
    size, patch = 128, 16
    n = size // patch
    images = low_information_images(8, (size, size), seed=3)
    ref_file = _content_free_reference(tmp_path / "ref.png", size, patch)
    reference = C.reference_tensor(size, CLIP_MEAN, CLIP_STD, ref_file)
    fired: Dict[str, torch.Tensor] = {}
    hook = bb.visual.transformer.resblocks[PLANTED_LAYER].mlp.gelu.register_forward_hook(
        lambda mod, inp, out: fired.__setitem__("a", out[..., PLANTED_UNIT]))
    counts = {"z-score 0.5": [0, 0, 0], "cosine 0.95": [0, 0, 0]}
    with torch.no_grad():
        u = F.normalize(U.teacher_tokens(bb, reference)[0], dim=-1)
        for side in range(4):
            comp, fg_mask = C.compose(images, reference, patch, side)
            tok, _ = U.teacher_tokens(bb, comp, [])
            truth = (fired["a"][:, 1:] > 1.0)[fg_mask].view(len(images), -1)
            fg = F.normalize(tok, dim=-1)[fg_mask].view(len(images), n * n, -1)
            for name, cos in (("z-score 0.5", None), ("cosine 0.95", 0.95)):
                clean, _ = D.fp_gp(fg, u, cosine=cos)
                c = counts[name]
                c[0] += int((~clean & truth).sum())
                c[1] += int((~clean).sum())
                c[2] += int(truth.sum())
    hook.remove()
    rows = {k: (tp / max(flagged, 1), tp / max(planted, 1)) for k, (tp, flagged, planted) in counts.items()}
    with capsys.disabled():
        print(f"\nFixed-pattern detector vs a content-free reference (planted share "
              f"{counts['cosine 0.95'][2] / (4 * 8 * n * n):.2f}):")
        for k, (p, r) in rows.items():
            print(f"  {k:12s} precision {p:.2f}  recall {r:.2f}")
    assert rows["cosine 0.95"][0] >= 0.8 and rows["cosine 0.95"][1] >= 0.8
    assert rows["z-score 0.5"][1] >= 0.8
