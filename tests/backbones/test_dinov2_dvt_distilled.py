"""DVT's distilled ViTs (HF jjiaweiyang/DVT ``voc_distilled/<timm name>.pth``) load through ``--weights``:
``{"model": {"model.<timm key>": ...}}`` (Denoising-ViT @ 82704df main_distillation.py), prefix stripped."""
from __future__ import annotations

import functools

import pytest
import torch

from harness.backbones.weights import sha256_file
from harness.errors import WeightsError
from harness.models import build_dense_model


@functools.lru_cache(maxsize=None)
def _distilled_state(bid: str) -> dict:
    """A random-init model's own state dict, perturbed (so loading visibly changes the weights), DVT-wrapped."""
    model = build_dense_model(bid, "vanilla", random_init=True).backbone.model
    g = torch.Generator().manual_seed(5)
    return {f"model.{k}": v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bid,key", [("test-vit-tiny", "model"), ("test-vit-tiny-p16", "model"),
                                     ("test-vit-tiny", "denoiser")])
def test_distilled_checkpoint_loads_as_backbone_weights(tmp_path, bid: str, key: str) -> None:
    """``"model"`` is what main_distillation.py writes; evaluate_dense_tasks.py also tries ``"denoiser"``.
    The test models are timm's DINOv2 (``vit_small_patch14[_reg4]_dinov2``) architecture, shrunk: the same
    ``VisionTransformer`` keys (``model.reg_token`` for the reg4 one) at a fraction of the build time."""
    state = _distilled_state(bid)
    path = tmp_path / "vit_small_patch14_dinov2.lvd142m.pth"
    torch.save({key: state, "optimizer": {"state": {}, "param_groups": []}, "step": 4999}, path)
    model = build_dense_model(bid, "vanilla", weights=str(path))
    loaded = model.backbone.model.state_dict()
    assert set(loaded) == {k[len("model."):] for k in state}
    for k, v in state.items():
        assert torch.equal(loaded[k[len("model."):]], v), k
    assert model.backbone.weights_id == sha256_file(str(path))
    with torch.no_grad():
        p = model.spec.patch_size
        assert model.forward_dense(torch.randn(1, 3, 4 * p, 5 * p)).patch.shape[-2:] == (4, 5)


def test_a_denoiser_file_passed_as_weights_says_what_it_is(tmp_path) -> None:
    path = tmp_path / "den.pth"
    torch.save({"denoiser": {"pos_embed": torch.zeros(1, 4, 64), "denoiser.norm1.weight": torch.ones(64)}}, path)
    with pytest.raises(WeightsError, match=f"--weights {path} is a DVT denoiser.*--method dvt --method-weights"):
        build_dense_model("test-vit-tiny", "vanilla", weights=str(path))


def test_a_distilled_file_of_another_size_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "vit_base.pth"
    big = {"model.cls_token": torch.zeros(1, 1, 768), "model.pos_embed": torch.zeros(1, 1370, 768)}
    torch.save({"model": big}, path)
    with pytest.raises(WeightsError, match="--weights .*vit_base.pth"):
        build_dense_model("test-vit-tiny", "vanilla", weights=str(path))
