"""Test-time registers on the planted-artifact backbone: the search finds the planted neuron, the
intervention removes the artifact and equals a line-by-line re-derivation of the authors' hook."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from harness.backbones.planted import PLANTED_LAYER, PLANTED_UNIT, low_information_images
from harness.cli import main
from harness.errors import WeightsError
from harness.methods.ttr import PACKAGED_NEURONS, read_neuron_file, signmax
from harness.methods.ttr_search import find_register_neurons, settings_for
from harness.models import attach_method, build_dense_model

BACKBONE = "test-planted-clip"


@pytest.fixture(scope="module")
def base():
    return build_dense_model(BACKBONE, "vanilla", random_init=True)


@pytest.fixture(scope="module")
def neuron_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ttr") / "neurons.json"
    path.write_text(json.dumps({"backbone": BACKBONE, "neurons": [[PLANTED_LAYER, PLANTED_UNIT]]}))
    return str(path)


def outlier_share(patch: torch.Tensor) -> torch.Tensor:
    """Per token of (B, C, h, w): norm > 3x the image's median patch norm."""
    n = patch.norm(dim=1).flatten(1)
    return n > 3 * n.median(dim=1, keepdim=True).values


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    """Low-information images as PNG files (de-normalised with CLIP's mean/std)."""
    from harness.backbones.clip import CLIP_MEAN, CLIP_STD

    folder.mkdir(parents=True, exist_ok=True)
    x = low_information_images(n, (224, 224), seed=seed)
    rgb = x * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    for i, im in enumerate(rgb):
        arr = (im.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:02d}.png")
    return folder


# -- the search ----------------------------------------------------------------------------------
def test_search_ranks_the_planted_neuron_first(base) -> None:
    x = low_information_images(6, (224, 224), seed=3)
    settings = settings_for(BACKBONE, detect_layer=-1, norm_threshold=100.0, highest_layer=2, top_k=5)
    res = find_register_neurons(base, [x[:3], x[3:]], settings)
    assert res.neurons[0] == [PLANTED_LAYER, PLANTED_UNIT]
    assert res.scores[0] > 5 * res.scores[1]
    assert res.images_with_outliers == 6 and all(layer <= 2 for layer, _ in res.neurons)


def test_find_neurons_cli_writes_a_file_that_ttr_loads(tmp_path, base, capsys) -> None:
    images = write_images(tmp_path / "images", 4)
    out = tmp_path / "neurons.json"
    rc = main(["ttr", "find-neurons", "--backbone", BACKBONE, "--images", str(images), "--out", str(out),
               "--random-init", "--device", "cpu", "--layer-limit", "2", "--top-k", "3", "--norm-threshold", "100"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["backbone"] == BACKBONE and data["weights"] == "random-init"
    assert data["neurons"][0] == [PLANTED_LAYER, PLANTED_UNIT] and len(data["neurons"]) == 3
    assert data["settings"] == {"detect_layer": -1, "norm_threshold": 100.0, "highest_layer": 2, "top_k": 3}
    assert f"layer {PLANTED_LAYER:>2} unit {PLANTED_UNIT:>5}" in capsys.readouterr().out
    model = attach_method(base.backbone, "ttr", method_weights=str(out))
    assert model.parts[0].neurons[PLANTED_LAYER][0] == PLANTED_UNIT


def test_a_backbone_without_published_settings_asks_for_them() -> None:
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="--norm-threshold"):
        settings_for(BACKBONE)
    assert settings_for("clip-b16-openai") == settings_for("clip-b16-openai", -1, 30.0, 5, 10)
    assert settings_for("dinov2-l14").top_k == 50


# -- the intervention ----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(224, 224), (224, 320)])
def test_ttr_removes_the_planted_artifact(base, neuron_file, size) -> None:
    x = low_information_images(4, size, seed=1)
    ttr = attach_method(base.backbone, "ttr", method_weights=neuron_file)
    with torch.no_grad():
        raw, clean = base.forward_dense(x).patch, ttr.forward_dense(x).patch
    before, after = outlier_share(raw), outlier_share(clean)
    print(f"{size}: outlier share {before.float().mean():.3f} -> {after.float().mean():.3f}")
    assert before.float().mean() >= 0.10
    assert after.float().mean() <= 0.01


def test_ttr_keeps_the_other_tokens(base, neuron_file) -> None:
    """At the native grid the plant is crisp: tokens that were not outliers keep their features."""
    x = low_information_images(4, (224, 224), seed=2)
    ttr = attach_method(base.backbone, "ttr", method_weights=neuron_file)
    with torch.no_grad():
        raw, clean = base.forward_dense(x).patch, ttr.forward_dense(x).patch
    keep = ~outlier_share(raw)
    cos = F.cosine_similarity(raw, clean, dim=1).flatten(1)[keep]
    print(f"non-outlier cosine: min {cos.min():.5f}, mean {cos.mean():.5f}")
    assert cos.min() >= 0.99


def test_batch_of_two_equals_two_batches_of_one(base, neuron_file) -> None:
    """The authors' hook edits batch element 0 only; ours takes the signed maximum per image."""
    x = low_information_images(2, (224, 320), seed=4)
    ttr = attach_method(base.backbone, "ttr", method_weights=neuron_file)
    with torch.no_grad():
        both = ttr.forward_dense(x).patch
        one = torch.cat([ttr.forward_dense(x[i:i + 1]).patch for i in range(2)])
    assert (both - one).abs().max() < 1e-5


def reference_ttr(visual: torch.nn.Module, x: torch.Tensor, neurons: dict) -> torch.Tensor:
    """The authors' forward, re-derived line by line on open_clip's modules (one image at a time).

    ``transformer.py`` L805-822 (``extra_tokens``): the register is a zero vector appended after the patch
    tokens, after the positional embedding and before ``ln_pre``. ``hook_fn.py::activate_on_registers``:
    at each listed layer, on the MLP activation, the largest-magnitude value over all tokens and the listed
    units goes into the register for those units; patch positions 1..N are set to 0 there.
    """
    outs = []
    for img in x:
        t = visual.conv1(img[None])
        gh, gw = t.shape[-2:]
        t = t.flatten(2).transpose(1, 2)
        pos = visual.positional_embedding
        m = int(round((pos.shape[0] - 1) ** 0.5))
        grid = pos[1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1).reshape(gh * gw, -1)
        t = torch.cat([visual.class_embedding.view(1, 1, -1), t], 1) + torch.cat([pos[:1], grid])[None]
        n_patch = gh * gw
        t = torch.cat([t, torch.zeros(1, 1, t.shape[-1])], 1)  # the register, no positional embedding
        t = visual.ln_pre(t)
        for li, blk in enumerate(visual.transformer.resblocks):
            y = blk.ln_1(t)
            t = t + blk.attn(y, y, y, need_weights=False)[0]
            h = blk.mlp.gelu(blk.mlp.c_fc(blk.ln_2(t)))
            if li in neurons:
                units = neurons[li]
                vals = h[0][:, units].flatten()
                mx = vals[vals.abs().argmax()]
                h = h.clone()
                h[0, 1:1 + n_patch, units] = 0
                h[0, -1, units] = mx
            t = t + blk.mlp.c_proj(h)
        t = visual.ln_post(t[:, 1:1 + n_patch]) @ visual.proj
        outs.append(t[0].transpose(0, 1).reshape(-1, gh, gw))
    return torch.stack(outs)


def test_ttr_equals_the_authors_forward_rederived(base, tmp_path) -> None:
    neurons = {PLANTED_LAYER: [PLANTED_UNIT, 3, 40], 2: [7]}
    path = tmp_path / "n.json"
    path.write_text(json.dumps({"backbone": BACKBONE, "neurons": [[layer, u] for layer, us in neurons.items()
                                                                  for u in us]}))
    x = low_information_images(2, (160, 224), seed=5)
    ttr = attach_method(base.backbone, "ttr", method_weights=str(path))
    with torch.no_grad():
        ours = ttr.forward_dense(x).patch
        ref = reference_ttr(base.backbone.model.visual, x, neurons)
    assert (ours - ref).abs().max() < 1e-4


def test_signmax_keeps_the_sign() -> None:
    assert signmax(torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.2, -0.1]])).tolist() == [-3.0, 0.5]


def test_ttr_composes_with_a_last_block_method(base, neuron_file) -> None:
    """``ttr+naclip``: NACLIP's Gaussian has zero rows and columns for the added token."""
    x = low_information_images(1, (224, 224), seed=6)
    model = attach_method(base.backbone, "ttr+naclip", method_weights=neuron_file)
    assert model.name == "ttr+naclip"
    with torch.no_grad():
        out = model.forward_dense(x)
    assert out.patch.shape == (1, 32, 14, 14) and torch.isfinite(out.patch).all()


# -- neuron files --------------------------------------------------------------------------------
def test_the_released_dinov2_l14_list_is_packaged() -> None:
    data = read_neuron_file(PACKAGED_NEURONS["dinov2-l14"])
    per_layer = {}
    for layer, _ in data["neurons"]:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    assert per_layer == {12: 1, 13: 1, 14: 8, 15: 9, 16: 9, 17: 17}
    assert "2506.08010" in data["source"]


@pytest.mark.parametrize("content,match", [
    ('{"backbone": "clip-b16-openai", "neurons": [[1, 2]]}', "not 'test-planted-clip'"),
    ('{"backbone": "test-planted-clip", "neurons": [[9, 2]]}', "layer 9 is out of range"),
    ('{"backbone": "test-planted-clip", "neurons": [[1, 9999]]}', "unit 9999 of layer 1 is out of range"),
    ('{"backbone": "test-planted-clip", "neuro', "not a test-time-register neuron file"),
    ('{"backbone": "test-planted-clip", "neurons": "all"}', "not a test-time-register neuron file"),
])
def test_bad_neuron_files_are_clear_errors(base, tmp_path, content, match) -> None:
    path = tmp_path / "n.json"
    path.write_text(content)
    with pytest.raises(WeightsError, match=match) as e:
        attach_method(base.backbone, "ttr", method_weights=str(path))
    assert str(path) in str(e.value)


def test_a_foreign_binary_file_is_a_clear_error(base, tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(WeightsError, match="not a test-time-register neuron file"):
        attach_method(base.backbone, "ttr", method_weights=str(path))


def test_ttr_without_a_file_says_how_to_make_one(base) -> None:
    with pytest.raises(WeightsError, match="harness ttr find-neurons"):
        attach_method(base.backbone, "ttr")
    assert os.path.isfile(PACKAGED_NEURONS["dinov2-l14"])
