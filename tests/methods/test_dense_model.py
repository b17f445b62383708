"""The dense interface v2: token layouts, compositions, intermediate layers, the shared trunk."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from harness.backbones.base import TokenLayout
from harness.backbones.planted import low_information_images
from harness.errors import ConfigError
from harness.methods.base import forward_dense_many
from harness.models import attach_method, build_dense_model, canonical_method
from harness.registry import RegistryError


@pytest.fixture(scope="module")
def planted():
    return build_dense_model("test-planted-clip", "vanilla", random_init=True)


@pytest.fixture(scope="module")
def neuron_file(tmp_path_factory) -> str:
    from harness.backbones.planted import PLANTED_LAYER, PLANTED_UNIT

    path = tmp_path_factory.mktemp("n") / "neurons.json"
    path.write_text(json.dumps({"backbone": "test-planted-clip", "neurons": [[PLANTED_LAYER, PLANTED_UNIT]]}))
    return str(path)


# -- layouts -------------------------------------------------------------------------------------
def test_layout_spans_and_insertion() -> None:
    lay = TokenLayout.standard((2, 3), has_cls=True, num_registers=4)
    assert lay.length == 11 and lay.cls_index == 0 and lay.span("registers") == slice(1, 5)
    assert lay.patches == slice(5, 11)
    after, at = lay.insert("added:ttr", 1, "after_patches")
    assert at == 11 and after.patches == slice(5, 11) and after.added == ["added:ttr"]
    before, at = lay.insert("added:reg", 16, "start")
    assert at == 0 and before.cls_index == 16 and before.patches == slice(21, 27)
    no_cls = TokenLayout.standard((2, 2), has_cls=False)
    assert no_cls.cls_index is None and no_cls.patches == slice(0, 4)


def test_a_backbone_without_cls_is_expressible() -> None:
    from harness.backbones.base import Tokens, split_features

    x = torch.randn(2, 6, 8)
    feats = split_features(Tokens(x, TokenLayout.standard((2, 3), has_cls=False)))
    assert feats.cls is None and feats.patch.shape == (2, 8, 2, 3)
    torch.testing.assert_close(feats.patch[:, :, 1, 2], x[:, 5])


def test_timm_registers_travel_in_the_layout() -> None:
    model = build_dense_model("test-vit-tiny", "vanilla", random_init=True)
    tokens = model.start(torch.randn(1, 3, 56, 42))
    assert tokens.layout.span("registers") == slice(1, 5) and tokens.layout.grid == (4, 3)


# -- compositions --------------------------------------------------------------------------------
def test_canonical_names_order_parts_by_where_they_act() -> None:
    assert canonical_method("tta+naclip") == "naclip+tta"
    assert canonical_method("naclip+ttr") == "ttr+naclip"
    assert canonical_method("clip+tta") == "tta"  # vanilla is the identity
    assert canonical_method("clip") == "vanilla"


def test_two_last_block_rules_are_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="parts 'naclip' and 'sclip' both replace the last block"):
        canonical_method("naclip+sclip")
    with pytest.raises(ConfigError, match="appears twice"):
        canonical_method("tta+tta")
    with pytest.raises(RegistryError, match="Did you mean: naclip"):
        canonical_method("ttr+nacl1p")
    with pytest.raises(ConfigError, match="empty part"):
        canonical_method("naclip+")


def test_params_go_to_the_part_that_declares_them(planted) -> None:
    m = attach_method(planted.backbone, "naclip+tta", {"views": 2, "naclip.sigma": 3.0})
    assert m.params == {"naclip": {"sigma": 3.0}, "tta": {"views": 2, "shift_frac": 0.15, "flip_prob": 0.5,
                                                          "seed": 0}}
    with pytest.raises(ConfigError, match="has no parameter 'sgima'; valid: naclip.sigma"):
        attach_method(planted.backbone, "naclip+tta", {"sgima": 3})


def test_method_weights_go_to_the_weighted_part(planted, neuron_file) -> None:
    with pytest.raises(ConfigError, match="no part takes weights"):
        attach_method(planted.backbone, "naclip+tta", method_weights=neuron_file)
    with pytest.raises(ConfigError, match="'tta' is not a part"):
        attach_method(planted.backbone, "ttr+naclip", method_weights={"tta": neuron_file})
    m = attach_method(planted.backbone, "ttr+naclip", method_weights={"ttr": neuron_file})
    assert list(m.method_weights) == ["ttr"] and len(m.method_weights["ttr"]) == 64


def test_composition_equals_the_parts_applied_by_hand(planted, neuron_file) -> None:
    """``ttr+naclip+tta`` = the TTA average over views of the ttr+naclip forward."""
    x = low_information_images(1, (224, 224), seed=0)
    full = attach_method(planted.backbone, "ttr+naclip+tta", {"views": 3}, method_weights=neuron_file)
    inner = attach_method(planted.backbone, "ttr+naclip", method_weights=neuron_file)
    tta = attach_method(planted.backbone, "tta", {"views": 3}).parts[0]
    with torch.no_grad():
        torch.testing.assert_close(full.forward_dense(x).patch, tta.wrap(inner.forward_dense, x).patch)


# -- intermediate layers -------------------------------------------------------------------------
def test_forward_tokens_reads_any_layer(planted) -> None:
    x = low_information_images(1, (224, 224), seed=0)
    with torch.no_grad():
        toks = planted.forward_tokens(x, [0, -1])
        last = planted.run_blocks(planted.start(x), 0, planted.backbone.num_blocks)
    assert set(toks) == {0, -1}
    torch.testing.assert_close(toks[-1].x, last.x)
    with pytest.raises(IndexError, match="out of range"):
        planted.forward_tokens(x, [7])


# -- the shared trunk ----------------------------------------------------------------------------
def _count_block_calls(backbone):
    counts: Counter = Counter()
    handles = [blk.register_forward_pre_hook(lambda m, a, i=i: counts.update([i]))
               for i, blk in enumerate(backbone.model.visual.transformer.resblocks)]
    return counts, handles


def test_shared_trunk_is_what_the_interface_says(planted, neuron_file) -> None:
    bb = planted.backbone
    models = [attach_method(bb, "naclip"), attach_method(bb, "maskclip"),
              attach_method(bb, "ttr+naclip", method_weights=neuron_file),
              attach_method(bb, "naclip+tta", {"views": 3})]
    assert [m.shared_blocks() for m in models] == [3, 3, None, None]
    x = low_information_images(2, (224, 224), seed=0)
    counts, handles = _count_block_calls(bb)
    try:
        with torch.no_grad():
            shared = forward_dense_many(models, x)
        # blocks 0-2: once for the shared naclip/maskclip trunk, once for ttr+naclip, once for the TTA batch;
        # block 3 is the last block, replaced by every method's rule
        assert dict(counts) == {0: 3, 1: 3, 2: 3}
        counts.clear()
        with torch.no_grad():
            alone = [m.forward_dense(x) for m in models]
        assert dict(counts) == {0: 4, 1: 4, 2: 4}
    finally:
        for h in handles:
            h.remove()
    for a, b in zip(shared, alone):
        assert (a.patch - b.patch).abs().max() < 1e-5


def test_a_layer_hook_shares_the_blocks_before_it(planted) -> None:
    """A method that only hooks block 2 shares blocks 0-1 with the others, and its hook edits only block 2."""
    from harness.methods.base import DenseModel, Method

    class ZeroUnit(Method):
        TOUCHES = ("layers",)

        def layer_hooks(self, backbone):  # type: ignore[no-untyped-def]
            def hook(act, tokens):  # type: ignore[no-untyped-def]
                act = act.clone()
                act[..., 5] = 0
                return act

            return {2: hook}

    bb = planted.backbone
    hooked = DenseModel(bb, [ZeroUnit()], name="zero-unit")
    naclip = attach_method(bb, "naclip")
    assert hooked.shared_blocks() == 2 and naclip.shared_blocks() == 3
    assert attach_method(bb, "vanilla").shared_blocks() == bb.num_blocks
    x = low_information_images(1, (224, 224), seed=0)
    counts, handles = _count_block_calls(bb)
    try:
        with torch.no_grad():
            shared = forward_dense_many([hooked, naclip], x)
    finally:
        for h in handles:
            h.remove()
    # trunk 0-1 once; block 2 by the hooked model and by the trunk (for naclip); block 3 by the hooked model
    # only (naclip replaces the last block)
    assert dict(counts) == {0: 1, 1: 1, 2: 2, 3: 1}
    with torch.no_grad():
        assert (shared[0].patch - hooked.forward_dense(x).patch).abs().max() < 1e-5
        assert (shared[0].patch - planted.forward_dense(x).patch).abs().max() > 1e-4  # the hook did something


def test_a_method_can_replace_the_vision_weights(planted) -> None:
    """``backbone``: the stages run on the method's own copy; the text tower and the backbone stay as they are."""
    import copy

    from harness.methods.base import DenseModel, Method

    class Student(Method):
        TOUCHES = ("backbone",)

        def vision(self, backbone):  # type: ignore[no-untyped-def]
            self.student = copy.deepcopy(backbone)
            with torch.no_grad():
                self.student.model.visual.proj.mul_(2.0)
            return self.student

    bb = planted.backbone
    model = DenseModel(bb, [Student()], name="student")
    x = low_information_images(1, (224, 224), seed=0)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_dense(x).patch, 2 * planted.forward_dense(x).patch)
    assert model.vision is not bb and model.backbone is bb and model.shared_blocks() is None
    assert not any(k.startswith("vision.") for k in model.state_dict())
    with pytest.raises(ConfigError, match="both replace the vision weights"):
        from harness.methods.base import check_composition

        class Other(Student):
            pass

        check_composition([Student(), Other()])
