"""The LaSt-ViT ids and their plain baselines load files in the authors' layouts (LAST-ViT @ cdeb884a README):
each file is built here from a randomly initialised model of the right architecture in that layout, loaded
through the backbone id with ``--weights``, and the dense output is compared with the source model's own
forward (patches as the library computes them; global token = LaSt over them, re-computed in numpy)."""
from __future__ import annotations

import argparse
import fractions
import functools

import numpy as np
import pytest
import torch

from harness.backbones.weights import resolve_weights, sha256_file
from harness.errors import WeightsError
from harness.models import build_dense_model, get_backbone_spec

from .test_lastvit_pooling import np_last_pool

SIZE = 224


@functools.lru_cache(maxsize=None)
def _image() -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _dense(bid: str, path: str):
    model = build_dense_model(bid, "vanilla", weights=path)
    assert model.backbone.weights_id == sha256_file(path)
    with torch.no_grad():
        return model, model.forward_dense(_image())


def _tokens(patch: torch.Tensor) -> np.ndarray:
    return patch.flatten(2).transpose(1, 2).numpy()


# -- supervised: torchvision VisionTransformer in a detectron2 checkpoint of their ClassificationNet ----------
@functools.lru_cache(maxsize=None)
def _torchvision_source():
    """torchvision ViT-B/16, random, with a non-zero class token (torchvision initialises it to zeros)."""
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(11)
        model = torchvision.models.vit_b_16().eval()
        model.class_token.data.normal_()
    with torch.no_grad():
        x = model._process_input(_image())
        tokens = model.encoder(torch.cat([model.class_token.expand(1, -1, -1), x], dim=1))  # after encoder.ln
    return model.state_dict(), tokens


def test_lastvit_sup_detectron2_checkpoint(tmp_path) -> None:
    state, tokens = _torchvision_source()
    path = str(tmp_path / "ViT_190k.pth")
    torch.save({"model": {f"model.{k}": v for k, v in state.items()}, "iteration": 190000,
                "scheduler": {"last_epoch": 190000}}, path)
    _, out = _dense("lastvit-b16-sup", path)
    np.testing.assert_allclose(_tokens(out.patch), tokens[:, 1:].numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(out.cls.numpy(), np_last_pool(tokens[:, 1:].numpy(), 1), rtol=0, atol=2e-5)


def test_torchvision_baseline_bare_state_dict_keeps_the_cls_output(tmp_path) -> None:
    state, tokens = _torchvision_source()
    path = str(tmp_path / "vit_b_16-c867db91.pth")
    torch.save(state, path)
    _, out = _dense("vit-b16-tv-in1k", path)
    np.testing.assert_allclose(_tokens(out.patch), tokens[:, 1:].numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(out.cls.numpy(), tokens[:, 0].numpy(), rtol=0, atol=2e-5)


# -- DINO: a facebookresearch/dino training checkpoint (student, teacher, args, ...) --------------------------
@functools.lru_cache(maxsize=None)
def _dino_source():
    """timm ``vit_base_patch16_224`` (DINO's ViT has its keys), random; teacher and student differ.

    timm's own initialisation: with ``weight_init="skip"`` the class token and the position embedding stay
    ``torch.empty`` memory (timm 1.0), whatever an earlier test left there -- often ~1e35, so every token came out
    NaN and the comparisons passed NaN against NaN, and sometimes finite garbage that failed them.
    """
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(12)
        model = timm.create_model("vit_base_patch16_224", num_classes=0).eval()
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    teacher = model.state_dict()
    student = {k: v + 0.05 for k, v in teacher.items()}
    with torch.no_grad():
        tokens = model.forward_features(_image())  # after the final norm
    assert torch.isfinite(tokens).all()
    return teacher, student, tokens


def _dino_checkpoint(path: str) -> None:
    teacher, student, _ = _dino_source()
    head = {"head.mlp.0.weight": torch.zeros(16, 768), "head.last_layer.weight_g": torch.ones(8, 1)}
    torch.save({"student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                            **{f"module.{k}": v for k, v in head.items()}},
                "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **head},
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 80,
                "args": argparse.Namespace(arch="vit_base", patch_size=16), "dino_loss": {"center": torch.zeros(1, 8)}},
               path)


def test_lastvit_dino_training_checkpoint_takes_the_teacher(tmp_path) -> None:
    *_, tokens = _dino_source()
    path = str(tmp_path / "dino0080.pth")
    _dino_checkpoint(path)
    _, out = _dense("lastvit-b16-dino", path)
    np.testing.assert_allclose(_tokens(out.patch), tokens[:, 1:].numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(out.cls.numpy(), np_last_pool(tokens[:, 1:].numpy(), 1), rtol=0, atol=2e-5)


def test_dino_baseline_bare_backbone_file_keeps_the_cls_output(tmp_path) -> None:
    teacher, _, tokens = _dino_source()
    path = str(tmp_path / "dino_vitbase16_pretrain.pth")
    torch.save(teacher, path)
    _, out = _dense("dino-b16", path)
    np.testing.assert_allclose(out.cls.numpy(), tokens[:, 0].numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(_tokens(out.patch), tokens[:, 1:].numpy(), rtol=0, atol=2e-5)


# -- CLIP: an open_clip training checkpoint, with and without the text tower --------------------------------
@functools.lru_cache(maxsize=None)
def _clip_source():
    """open_clip ViT-B-16-quickgelu, random with another seed than the harness's random init; reference: its own
    forward with ``_global_pool`` replaced by LaSt (numpy) on the ``ln_post`` tokens, then ``proj``."""
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(13)
        model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    visual = model.visual
    visual.output_tokens = True
    visual._global_pool = lambda x: (torch.from_numpy(np_last_pool(x[:, 1:].numpy(), 1)).to(x.dtype), x[:, 1:])
    model.requires_grad_(False)
    with torch.no_grad():
        pooled, tokens = visual(_image())
        text = open_clip.get_tokenizer("ViT-B-16-quickgelu")(["a photo of a cat."])
        text_emb = model.encode_text(text)
    return model.state_dict(), pooled, tokens @ visual.proj, text, text_emb


def test_lastvit_clip_training_checkpoint_with_text_tower(tmp_path) -> None:
    state, pooled, patches, text, text_emb = _clip_source()
    path = str(tmp_path / "openai_b_16.pt")
    torch.save({"epoch": 10, "name": "lastvit", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": []}}, path)
    model, out = _dense("lastvit-b16-clip", path)
    np.testing.assert_allclose(_tokens(out.patch), patches.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(out.cls.numpy(), pooled.numpy(), rtol=0, atol=2e-5)
    assert model.backbone.text_missing is None
    with torch.no_grad():
        np.testing.assert_allclose(model.backbone.encode_text(text).numpy(), text_emb.numpy(), rtol=0, atol=2e-5)


def test_lastvit_clip_vision_only_file_probes_but_refuses_text(tmp_path) -> None:
    state, pooled, patches, text, _ = _clip_source()
    path = str(tmp_path / "openai_b_16.pt")
    torch.save({k: v for k, v in state.items() if k.startswith("visual.")}, path)
    model, out = _dense("lastvit-b16-clip", path)
    np.testing.assert_allclose(_tokens(out.patch), patches.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(out.cls.numpy(), pooled.numpy(), rtol=0, atol=2e-5)
    for call in (model.backbone.check_text, lambda: model.backbone.encode_text(text),
                 lambda: model.backbone.tokenize(["a cat"])):
        with pytest.raises(WeightsError, match=f"{path}.*no text tower.*probes"):
            call()


@pytest.mark.slow  # a second ViT-B/16 CLIP build; check_text itself is covered above
def test_ovss_names_the_vision_only_file(tmp_path, capsys) -> None:
    from harness.cli import main
    from harness.synthetic.segmentation import write_synthetic_dataset

    state, *_ = _clip_source()
    path = str(tmp_path / "vision_only.pt")
    torch.save({k: v for k, v in state.items() if k.startswith("visual.")}, path)
    root = write_synthetic_dataset("voc21", str(tmp_path / "voc"), num_images=1, size=(32, 32))
    rc = main(["run", "ovss", "--backbone", "lastvit-b16-clip", "--weights", path, "--method", "vanilla",
               "--dataset", "voc21", "--data-root", root, "--results-dir", str(tmp_path / "res"), "--workers", "0",
               "--no-progress"])
    assert rc == 2
    assert f"the weights file {path}" in capsys.readouterr().err


# -- foreign files: one clear error each, before any model is built where the file alone tells ---------------
LAYOUTS = {"lastvit-b16-sup": "torchvision", "lastvit-b16-dino": "DINO", "lastvit-b16-clip": "open_clip"}


@pytest.mark.parametrize("bid", sorted(LAYOUTS))
def test_truncated_file_non_dict_and_other_layout_are_clear_errors(tmp_path, bid: str) -> None:
    good = tmp_path / "good.pth"
    torch.save({"conv_proj.weight": torch.zeros(2, 3), "encoder.pos_embedding": torch.zeros(2)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match=f"--weights {truncated}: not a readable torch checkpoint"):
        build_dense_model(bid, weights=str(truncated))
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(WeightsError, match=f"--weights {listed}: holds a list, not a state dict"):
        build_dense_model(bid, weights=str(listed))
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": fractions.Fraction(1, 3)}, pickled)  # a pickled object weights_only=True refuses
    with pytest.raises(WeightsError, match=f"--weights {pickled}: not a readable torch checkpoint"):
        build_dense_model(bid, weights=str(pickled))
    other = tmp_path / "other_layout.pth"  # a BERT-like state dict
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(8, 4),
                "encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4)}, other)
    with pytest.raises(WeightsError, match=f"--weights {other}"):
        build_dense_model(bid, weights=str(other))


@pytest.mark.parametrize("bid", ["lastvit-b16-sup", "lastvit-b16-dino",
                                 pytest.param("lastvit-b16-clip", marks=pytest.mark.slow)])  # CLIP: a full build
def test_same_layout_other_size_is_a_clear_error(tmp_path, bid: str) -> None:
    """A ViT-L-sized tensor in an otherwise right file (another model size) is refused naming the file."""
    if bid == "lastvit-b16-sup":
        state = dict(_torchvision_source()[0])
        state["conv_proj.weight"] = torch.zeros(1024, 3, 16, 16)
    elif bid == "lastvit-b16-dino":
        state = dict(_dino_source()[0])
        state["blocks.0.mlp.fc1.weight"] = torch.zeros(4096, 768)
    else:
        state = {k: v for k, v in _clip_source()[0].items() if k.startswith("visual.")}
        state["visual.conv1.weight"] = torch.zeros(1024, 3, 16, 16)
    path = tmp_path / "large.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=f"--weights {path}"):
        build_dense_model(bid, weights=str(path))


def test_no_local_weights_names_the_release_url(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for bid, asset in (("lastvit-b16-dino", "weights/dino0080.pth"), ("lastvit-b16-clip", "weights/openai_b_16.pt"),
                       ("lastvit-b16-sup", "weights2/ViT_190k.pth")):
        url = f"https://github.com/ChengShiest/LAST-ViT/releases/download/{asset}"
        with pytest.raises(WeightsError, match=f"(?s){bid}.*{tmp_path / 'torch' / 'hub' / 'checkpoints'}.*{url}.*"
                                               f"--weights FILE"):
            resolve_weights(get_backbone_spec(bid), None, allow_download=False)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "ViT_190k.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_weights(get_backbone_spec("lastvit-b16-sup"), None, allow_download=False) == str(cached)
