"""Class-name query embeddings (harness/text/encoder.py) and their on-disk cache.

The reference re-derives each query independently: the test renders the prompts itself, runs
open_clip's own ``model.encode_text`` on the full 77 tokens, normalises every prompt embedding,
averages and normalises again (wangf3014/SCLIP@b56bd30 ``clip_segmentor.py``). A 3-template set keeps
it fast on CPU; it is registered under its own name, so the 80-template set is never altered.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.models import build_dense_model
from harness.text import templates
from harness.text.encoder import cache_key, class_queries, encode_names

SMALL = "test-three"
THREE = ["a photo of a {}.", "a bad photo of the {}.", "itap of my {}."]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    return build_dense_model("clip-b16-openai", "clip", random_init=True)


@pytest.fixture(autouse=True)
def small_templates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(templates.TEMPLATE_SETS, SMALL, list(THREE))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "harness-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def reference_query(model, name: str) -> torch.Tensor:
    import open_clip

    prompts = [t.format(name) for t in THREE]
    with torch.no_grad():
        e = model.backbone.model.encode_text(open_clip.tokenize(prompts)).float()
    e = e / e.norm(dim=-1, keepdim=True)
    m = e.mean(0)
    return m / m.norm()


def test_queries_match_independent_derivation(model, tmp_path):
    names = [["sky"], ["television monitor"]]
    q = class_queries(model, names, SMALL, CPU, cache_dir=str(tmp_path), use_cache=False)
    assert q.embeddings.shape == (2, 512) and q.num_classes == 2
    assert q.query_class.tolist() == [0, 1]
    assert torch.allclose(q.embeddings.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert (q.embeddings[0] - q.embeddings[1]).abs().max().item() > 1e-3
    for i, (name,) in enumerate(names):
        assert (q.embeddings[i] - reference_query(model, name)).abs().max().item() < 1e-5, name
    # names are inserted verbatim, trailing space included (the tokenizer then decides what it means)
    assert templates.render(SMALL, "wood ")[0] == "a photo of a wood ."


def test_encode_names_batches_do_not_change_the_result(model):
    names = ["cat", "traffic light"]
    a = encode_names(model, names, SMALL, CPU)
    b = encode_names(model, names, SMALL, CPU, batch_size=4)  # 6 prompts in 2 batches, split inside a name
    assert (a - b).abs().max().item() < 1e-5


def test_multi_name_classes_give_one_query_per_name(model, tmp_path):
    names = [["background"], ["person", "person in shirt", "people"], ["car"], ["bus", "minibus"]]
    q = class_queries(model, names, SMALL, CPU, cache_dir=str(tmp_path), use_cache=False)
    assert q.num_classes == 4
    assert q.query_class.tolist() == [0, 1, 1, 1, 2, 3, 3]
    assert q.embeddings.shape == (7, 512)
    flat = [n for aliases in names for n in aliases]
    for i in (2, 6):
        assert (q.embeddings[i] - reference_query(model, flat[i])).abs().max().item() < 1e-5, flat[i]
    # the same name gives the same query, whichever class list it sits in
    single = class_queries(model, [["people"]], SMALL, CPU, use_cache=False)
    assert (single.embeddings[0] - q.embeddings[3]).abs().max().item() < 1e-5


def test_cache_hit_on_second_call(model, tmp_path):
    names = [["road"], ["sidewalk", "pavement"]]
    first = class_queries(model, names, SMALL, CPU, cache_dir=str(tmp_path))
    second = class_queries(model, names, SMALL, CPU, cache_dir=str(tmp_path))
    assert not first.cache_hit and second.cache_hit
    assert torch.equal(first.embeddings, second.embeddings)
    assert torch.equal(first.query_class, second.query_class) and second.num_classes == 2
    files = list((tmp_path / "text").glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("clip-b16-openai-")
    # without a cache_dir, $HARNESS_CACHE is used
    third = class_queries(model, names, SMALL, CPU)
    assert not third.cache_hit
    assert list((tmp_path / "harness-cache" / "text").glob("*.pt"))


def test_cache_key_covers_names_templates_weights_and_backbone(monkeypatch):
    names = [["road"], ["sidewalk", "pavement"]]
    base = cache_key("clip-b16-openai", "random-init", SMALL, names)
    assert base == cache_key("clip-b16-openai", "random-init", SMALL, [list(n) for n in names])  # stable
    others = {
        "name order": cache_key("clip-b16-openai", "random-init", SMALL, names[::-1]),
        "other name": cache_key("clip-b16-openai", "random-init", SMALL, [["road"], ["sidewalk", "walkway"]]),
        "grouping": cache_key("clip-b16-openai", "random-init", SMALL, [["road"], ["sidewalk"], ["pavement"]]),
        "space": cache_key("clip-b16-openai", "random-init", SMALL, [["road "], ["sidewalk", "pavement"]]),
        "template set": cache_key("clip-b16-openai", "random-init", "openai_imagenet_80", names),
        "weights": cache_key("clip-b16-openai", "0" * 64, SMALL, names),
        "backbone": cache_key("clip-b16-laion2b", "random-init", SMALL, names),
    }
    # same template-set name, other prompt strings: the key hashes the content, not only the name
    monkeypatch.setitem(templates.TEMPLATE_SETS, SMALL, THREE[:2] + ["a sculpture of a {}."])
    others["template content"] = cache_key("clip-b16-openai", "random-init", SMALL, names)
    keys = [base, *others.values()]
    assert len(set(keys)) == len(keys), others


def test_changed_inputs_miss_the_cache(model, tmp_path, monkeypatch):
    names = [["grass"], ["tree"]]
    assert not class_queries(model, names, SMALL, CPU, cache_dir=str(tmp_path)).cache_hit
    assert class_queries(model, names, SMALL, CPU, cache_dir=str(tmp_path)).cache_hit
    assert not class_queries(model, [["grass"], ["trees"]], SMALL, CPU, cache_dir=str(tmp_path)).cache_hit
    monkeypatch.setattr(model.backbone, "weights_id", "f" * 64)  # e.g. real weights instead of random-init
    assert not class_queries(model, names, SMALL, CPU, cache_dir=str(tmp_path)).cache_hit
    monkeypatch.undo()
    monkeypatch.setitem(templates.TEMPLATE_SETS, SMALL, ["a photo of a {}.", "a drawing of a {}."])
    assert not class_queries(model, names, SMALL, CPU, cache_dir=str(tmp_path)).cache_hit
