"""``--method unirefiner``: the authors' file layouts load onto open_clip towers tensor by tensor, the ring is padded
inside the forward and dropped from the output, and foreign files stop with one clear error."""
from __future__ import annotations

from typing import Dict

import numpy as np
import pytest
import torch

from harness.backbones.planted import low_information_images
from harness.errors import ConfigError, WeightsError
from harness.methods.unirefiner import TOKEN_KIND, pad_ring, ring_mask
from harness.methods.unirefiner_hf import HFCLIPVision, lora_targets, openclip_to_hf
from harness.models import build_dense_model

BACKBONE = "test-planted-clip"


@pytest.fixture(scope="module")
def vanilla():
    return build_dense_model(BACKBONE, random_init=True)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return low_information_images(2, (64, 96), seed=1)


def refined(path: str, **params):
    return build_dense_model(BACKBONE, "unirefiner", params=params, method_weights=path, random_init=True)


def hf_by_hand(visual: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The Hugging Face CLIP vision names of an open_clip tower, written out here (not with the harness map)."""
    d = visual["class_embedding"].shape[0]
    out = {"embeddings.class_embedding": visual["class_embedding"],
           "embeddings.patch_embedding.weight": visual["conv1.weight"],
           "embeddings.position_embedding.weight": visual["positional_embedding"],
           "pre_layrnorm.weight": visual["ln_pre.weight"], "pre_layrnorm.bias": visual["ln_pre.bias"],
           "post_layernorm.weight": visual["ln_post.weight"], "post_layernorm.bias": visual["ln_post.bias"],
           "visual_projection.weight": visual["proj"].T}
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in visual:
        oc, hf = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        w, b = visual[oc + "attn.in_proj_weight"], visual[oc + "attn.in_proj_bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[hf + f"self_attn.{name}.weight"] = w[j * d:(j + 1) * d]
            out[hf + f"self_attn.{name}.bias"] = b[j * d:(j + 1) * d]
        for a, c in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[hf + a + ".weight"], out[hf + a + ".bias"] = visual[oc + c + ".weight"], visual[oc + c + ".bias"]
        i += 1
    return {k: v.clone() for k, v in out.items()}


def test_unperturbed_hf_file_equals_vanilla_without_ring(vanilla, images, tmp_path) -> None:
    hf = hf_by_hand(vanilla.backbone.visual.state_dict())
    assert set(hf) == set(openclip_to_hf(vanilla.backbone.visual.state_dict()))
    path = str(tmp_path / "model_final.pt")
    torch.save(hf, path)
    a, b = vanilla.forward_dense(images), refined(path, ring=0, pos_interpolation="offset").forward_dense(images)
    assert torch.equal(a.patch, b.patch) and torch.equal(a.cls, b.cls)
    with_ring = refined(path).forward_dense(images)
    assert with_ring.patch.shape == a.patch.shape  # ring tokens dropped from the dense output
    assert not torch.allclose(with_ring.patch, a.patch)


def test_every_tensor_lands_in_its_place(vanilla, tmp_path) -> None:
    """Each HF tensor gets its own offset; the refined open_clip tower must carry it at the matching place."""
    visual = {k: v.clone() for k, v in vanilla.backbone.visual.state_dict().items()}
    hf = hf_by_hand(visual)
    offsets = {k: 0.001 * (i + 1) for i, k in enumerate(sorted(hf))}
    torch.save({k: v + offsets[k] for k, v in hf.items()}, tmp_path / "f.pt")
    model = refined(str(tmp_path / "f.pt"), ring=0)
    got = model.vision.base.visual.state_dict()
    d = visual["class_embedding"].shape[0]
    assert torch.allclose(got["proj"], visual["proj"] + offsets["visual_projection.weight"])
    assert torch.allclose(got["conv1.weight"], visual["conv1.weight"] + offsets["embeddings.patch_embedding.weight"])
    for i in range(4):
        w = got[f"transformer.resblocks.{i}.attn.in_proj_weight"]
        base = visual[f"transformer.resblocks.{i}.attn.in_proj_weight"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            off = offsets[f"encoder.layers.{i}.self_attn.{name}.weight"]
            assert torch.allclose(w[j * d:(j + 1) * d], base[j * d:(j + 1) * d] + off), (i, name)
        assert torch.allclose(got[f"transformer.resblocks.{i}.mlp.c_proj.bias"],
                              visual[f"transformer.resblocks.{i}.mlp.c_proj.bias"]
                              + offsets[f"encoder.layers.{i}.mlp.fc2.bias"])
    # the backbone itself is untouched (the method runs on its own copy)
    assert torch.equal(vanilla.backbone.visual.proj, visual["proj"])


def test_peft_epoch_file_is_merged_as_w_plus_alpha_over_r_b_a(vanilla, images, tmp_path) -> None:
    """A hand-made per-epoch file: base_layer + lora_A/lora_B under base_model.model.; expected W + 2 B A (numpy)."""
    hf = hf_by_hand(vanilla.backbone.visual.state_dict())
    rng = np.random.default_rng(0)
    linear = {k[:-len(".weight")] for k in hf if k.endswith(".weight") and hf[k].dim() == 2
              and "embedding" not in k}
    state: Dict[str, torch.Tensor] = {}
    expected: Dict[str, np.ndarray] = {}
    for k, v in hf.items():
        mod, _, kind = k.rpartition(".")
        if mod in linear:
            state[f"base_model.model.{mod}.base_layer.{kind}"] = v
        else:
            state[f"base_model.model.{k}"] = v
    for mod in linear:
        w = hf[mod + ".weight"].numpy().astype(np.float64)
        a = rng.normal(0, 0.1, (8, w.shape[1]))
        b = rng.normal(0, 0.1, (w.shape[0], 8))
        state[f"base_model.model.{mod}.lora_A.default.weight"] = torch.tensor(a, dtype=torch.float32)
        state[f"base_model.model.{mod}.lora_B.default.weight"] = torch.tensor(b, dtype=torch.float32)
        expected[mod] = w + (16 / 8) * b @ a
    torch.save({"state_dict": state}, tmp_path / "epoch_1.pt")
    model = refined(str(tmp_path / "epoch_1.pt"), ring=0)
    got = model.vision.base.visual.state_dict()
    d = hf["embeddings.class_embedding"].shape[0]
    np.testing.assert_allclose(got["proj"].numpy().T, expected["visual_projection"], atol=1e-5)
    np.testing.assert_allclose(got["transformer.resblocks.2.attn.in_proj_weight"][d:2 * d].numpy(),
                               expected["encoder.layers.2.self_attn.k_proj"], atol=1e-5)
    np.testing.assert_allclose(got["transformer.resblocks.0.mlp.c_fc.weight"].numpy(),
                               expected["encoder.layers.0.mlp.fc1"], atol=1e-5)
    assert model.describe()["config"]["file_layout"] == "epoch"


def test_peft_library_file_loads_like_its_own_merge(vanilla, tmp_path) -> None:
    """The real ``peft`` wrapping of the tower: its state dict loads to what merge_and_unload gives."""
    from peft import LoraConfig, get_peft_model

    tower = HFCLIPVision(vanilla.backbone.visual)
    peft_model = get_peft_model(tower, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                  target_modules=lora_targets(tower)))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    torch.save({"state_dict": peft_model.state_dict()}, tmp_path / "epoch.pt")
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    torch.save(merged, tmp_path / "final.pt")
    assert "visual_projection.weight" in merged and "encoder.layers.3.self_attn.q_proj.weight" in merged
    a = refined(str(tmp_path / "epoch.pt"), ring=0).vision.base.visual.state_dict()
    b = refined(str(tmp_path / "final.pt"), ring=0).vision.base.visual.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_hf_tower_computes_the_open_clip_forward(vanilla, images, tmp_path) -> None:
    tower = HFCLIPVision(vanilla.backbone.visual)
    x, grid = tower(images)
    path = str(tmp_path / "f.pt")
    torch.save(openclip_to_hf(vanilla.backbone.visual.state_dict()), path)
    model = refined(path, ring=0)  # pos_interpolation=size: the HF tower's rule
    ref = model.vision.final_norm(model.run_blocks(model.start(images), 0, model.vision.num_blocks).x)
    assert grid == (4, 6)
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4)


def test_ring_padding_and_layout(vanilla, images, tmp_path) -> None:
    torch.save(openclip_to_hf(vanilla.backbone.visual.state_dict()), tmp_path / "f.pt")
    padded = pad_ring(images, 16, 1, "zero")
    assert padded.shape == (2, 3, 96, 128)
    assert torch.equal(padded[:, :, 16:80, 16:112], images) and float(padded[:, :, :16].abs().max()) == 0.0
    mask = ring_mask((6, 8), 1).view(6, 8)
    assert int(mask.sum()) == 2 * 8 + 2 * 4 and not bool(mask[1:5, 1:7].any())
    model = refined(str(tmp_path / "f.pt"), ring=2, fill="normal")
    tokens = model.start(images)
    assert tokens.layout.grid == (4, 6) and dict(tokens.layout.segments)[TOKEN_KIND] == 8 * 10 - 4 * 6
    a, b = model.forward_dense(images), model.forward_dense(images)
    assert torch.equal(a.patch, b.patch)  # a seeded filler: the same window gets the same ring
    # the inner tokens are exactly those of the padded image (the ring only moves to the end of the sequence)
    plain = vanilla.backbone.embed(pad_ring(images, 16, 1, "zero"))
    ring1 = refined(str(tmp_path / "f.pt"), pos_interpolation="offset").start(images)
    inner = plain.x[:, 1:].reshape(2, 6, 8, -1)[:, 1:5, 1:7].reshape(2, 24, -1)
    expected = vanilla.backbone.pre_norm(torch.cat([plain.x[:, :1], inner], 1))[:, 1:]
    torch.testing.assert_close(ring1.x[:, 1:25], expected)


def test_composes_with_a_last_block_method(vanilla, images, tmp_path) -> None:
    torch.save(openclip_to_hf(vanilla.backbone.visual.state_dict()), tmp_path / "f.pt")
    m = build_dense_model(BACKBONE, "unirefiner+naclip", method_weights=str(tmp_path / "f.pt"), random_init=True)
    assert m.name == "unirefiner+naclip" and m.shared_blocks() is None
    assert m.forward_dense(images).patch.shape == (2, 32, 4, 6)


def test_foreign_files_give_one_clear_error(vanilla, tmp_path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=r"notes\.pt: not a readable PyTorch checkpoint"):
        refined(str(text))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match=r"list\.pt: not a state dict of tensors"):
        refined(str(tmp_path / "list.pt"))
    torch.save(vanilla.backbone.visual.state_dict(), tmp_path / "openclip.pt")  # open_clip names, not HF
    with pytest.raises(WeightsError, match=r"openclip\.pt: not a UniRefiner file .*missing keys: \d+ .*expected"):
        refined(str(tmp_path / "openclip.pt"))
    hf = openclip_to_hf(vanilla.backbone.visual.state_dict())
    hf["encoder.layers.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    torch.save(hf, tmp_path / "shape.pt")
    with pytest.raises(WeightsError, match=r"shape\.pt: encoder\.layers\.0\.mlp\.fc1\.weight has shape \(3, 3\)"):
        refined(str(tmp_path / "shape.pt"))
    with pytest.raises(WeightsError, match="needs --method-weights"):
        build_dense_model(BACKBONE, "unirefiner", random_init=True)
    torch.save(openclip_to_hf(vanilla.backbone.visual.state_dict()), tmp_path / "ok.pt")
    with pytest.raises(ConfigError, match="fill must be one of"):
        refined(str(tmp_path / "ok.pt"), fill="grey")
    with pytest.raises(ConfigError, match="ring must be an integer >= 0"):
        refined(str(tmp_path / "ok.pt"), ring=-1)


def test_merged_layout_is_the_one_transformers_loads(vanilla, images, tmp_path) -> None:
    """Independent check of the key names and the positional rule: transformers' own CLIPVisionModelWithProjection
    loads the file (strictly) and its projected, post-layernormed patch tokens equal our dense output."""
    transformers = pytest.importorskip("transformers")
    hf = openclip_to_hf(vanilla.backbone.visual.state_dict())
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                                        num_attention_heads=2, image_size=224, patch_size=16, hidden_act="gelu",
                                        projection_dim=32, layer_norm_eps=1e-5)
    model = transformers.CLIPVisionModelWithProjection(cfg).eval()
    own = {k: v for k, v in hf.items() if k != "visual_projection.weight"}
    state = {f"vision_model.{k}": v for k, v in own.items()}
    state["visual_projection.weight"] = hf["visual_projection.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    with torch.no_grad():
        out = model.vision_model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
        feats = model.visual_projection(model.vision_model.post_layernorm(out))[:, 1:]
    torch.save(hf, tmp_path / "f.pt")
    ours = refined(str(tmp_path / "f.pt"), ring=0).forward_dense(images).patch.flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours, feats, atol=1e-4, rtol=1e-4)
