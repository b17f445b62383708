"""Text encoding at the FLOP floor: length-sorted batches cut at their own longest prompt, each distinct
prompt encoded once across datasets and aliases, and nothing of it moves an embedding.

The reference is open_clip's own ``model.encode_text`` on the full 77-token context, run by the test on
the tiny text tower of ``test-planted-clip`` (causal, EOT-pooled, like every CLIP tower we register) for
every name of every registered name set.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.models import build_dense_model
from harness.text import templates
from harness.text.encoder import CONTEXT_LENGTH, PromptStore, TextStats, class_queries, encode_prompts
from harness.text.names import available_name_sets, load_name_set

CPU = torch.device("cpu")
SET = "test-length-spread"


@pytest.fixture(scope="module")
def model():
    return build_dense_model("test-planted-clip", "vanilla", random_init=True)


@pytest.fixture(autouse=True)
def spread_templates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The shortest and the three longest of the 80 OpenAI templates: every prompt length the 80 give."""
    full = sorted(templates.TEMPLATE_SETS["openai_imagenet_80"], key=len)
    monkeypatch.setitem(templates.TEMPLATE_SETS, SET, [full[0]] + full[-3:])
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))


def reference_77(bb, prompts):
    import open_clip

    tokens = open_clip.tokenize(prompts, context_length=CONTEXT_LENGTH)
    with torch.no_grad():
        e = bb.model.encode_text(tokens).float()
    return e / e.norm(dim=-1, keepdim=True)


def test_every_registered_name_set_matches_the_77_token_encoding(model, tmp_path) -> None:
    bb = model.backbone
    for set_name, keys in available_name_sets().items():
        for key in keys:
            names = load_name_set(set_name, key)
            q = class_queries(model, names, SET, CPU, cache_dir=str(tmp_path))
            flat = [n for aliases in names for n in aliases]
            per_prompt = reference_77(bb, [p for n in flat for p in templates.render(SET, n)])
            ref = per_prompt.view(len(flat), len(templates.TEMPLATE_SETS[SET]), -1).mean(1)
            ref = ref / ref.norm(dim=-1, keepdim=True)
            err = (q.embeddings - ref).abs().max().item()
            assert err < 1e-5, f"{set_name}/{key}: {err}"


def test_sorted_batches_spend_fewer_tokens_than_unsorted_and_77(model) -> None:
    bb = model.backbone
    names = [n for aliases in load_name_set("sclip", "ade20k") for n in aliases]
    prompts = [p for n in names for p in templates.render(SET, n)]
    stats = TextStats()
    out = encode_prompts(bb, prompts, CPU, batch_size=64, stats=stats)
    lengths = bb.tokenize(prompts).argmax(-1) + 1
    unsorted = sum(len(lengths[i:i + 64]) * int(lengths[i:i + 64].max()) for i in range(0, len(prompts), 64))
    srt = lengths.sort().values
    assert stats.tokens == sum(len(srt[i:i + 64]) * int(srt[i:i + 64].max()) for i in range(0, len(srt), 64))
    assert stats.tokens < unsorted < stats.tokens_77 == len(prompts) * CONTEXT_LENGTH
    assert stats.encoded == stats.distinct == len(set(prompts)) and stats.prompts_per_s > 0
    assert (out - reference_77(bb, prompts)).abs().max().item() < 1e-5


def test_a_prompt_is_encoded_once_across_datasets_and_aliases(model, tmp_path) -> None:
    voc20 = load_name_set("sclip", "voc20")
    voc21 = load_name_set("sclip", "voc21")  # voc20's classes plus background
    first = class_queries(model, voc20, SET, CPU, cache_dir=str(tmp_path))
    assert not first.cache_hit and first.stats.encoded == first.stats.distinct > 0
    second = class_queries(model, voc21, SET, CPU, cache_dir=str(tmp_path))
    new_names = {n for c in voc21 for n in c} - {n for c in voc20 for n in c}
    assert second.stats.encoded == len({p for n in new_names for p in templates.render(SET, n)})
    # the same name list again: a hit of the name-list cache, nothing encoded
    third = class_queries(model, voc21, SET, CPU, cache_dir=str(tmp_path))
    assert third.cache_hit and third.stats.encoded == 0
    assert torch.equal(third.embeddings, second.embeddings)
    # duplicated prompts inside one call (an alias shared by two classes) are encoded once
    stats = TextStats()
    encode_prompts(model.backbone, ["a photo of a cat."] * 3 + ["a photo of a dog."], CPU, stats=stats)
    assert (stats.prompts, stats.distinct, stats.encoded) == (4, 2, 2)


def test_corrupt_cache_entries_are_rebuilt_not_used(model, tmp_path) -> None:
    names = load_name_set("sclip", "voc20")
    good = class_queries(model, names, SET, CPU, cache_dir=str(tmp_path))
    for f in (tmp_path / "text").rglob("*.pt"):
        f.write_bytes(b"not a torch file")
    again = class_queries(model, names, SET, CPU, cache_dir=str(tmp_path))
    assert not again.cache_hit and again.stats.encoded == again.stats.distinct
    assert torch.allclose(again.embeddings, good.embeddings, atol=1e-6)
    assert PromptStore(str(next((tmp_path / "text" / "prompts").glob("*.pt")))).entries  # rewritten whole
