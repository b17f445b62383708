"""The open_clip backbone adapter: ``--weights FILE``, the HF-cache lookup, pos-embed interpolation,
the truncated text pass and reproducible random-init builds.

No network and no real weights: a random-init ``clip-b16-openai`` is saved to a temporary file and
reloaded through the same code path real weights take. Every weight lookup points at temporary
caches (HF_HOME / HF_HUB_CACHE / HOME) so the user's cache is never touched.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.backbones.pos_embed import interpolate_patch_pos_embed
from harness.backbones.weights import find_local_weights, hf_cache_dir, resolve_weights
from harness.errors import WeightsError
from harness.models import build_dense_model, get_backbone_spec

BACKBONE = "clip-b16-openai"
X_SHAPE = (2, 3, 48, 80)  # 3 x 5 patches: non-square, cheap on CPU


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "harness-cache"))


@pytest.fixture(scope="module")
def random_model():
    return build_dense_model(BACKBONE, "clip", random_init=True)


@pytest.fixture(scope="module")
def weights_file(random_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "clip-b16-random.pt"
    torch.save(random_model.backbone.model.state_dict(), path)
    yield path
    path.unlink()  # ~600 MB: do not leave it in pytest's kept temp folders


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(*X_SHAPE, generator=g)


# -- --weights FILE -----------------------------------------------------------------------------
def test_weights_file_round_trip(random_model, weights_file, x):
    loaded = build_dense_model(BACKBONE, "clip", weights=str(weights_file))
    assert loaded.backbone.weights_id == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert random_model.backbone.weights_id == "random-init"
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        a, b = random_model.forward_dense(x), loaded.forward_dense(x)
    assert a.patch.shape == (2, 512, 3, 5)
    assert torch.equal(a.patch, b.patch) and torch.equal(a.cls, b.cls)


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_unreadable_weights_file_is_a_weights_error(weights_file, tmp_path, kind):
    bad = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        with open(weights_file, "rb") as f:
            bad.write_bytes(f.read(1 << 20))
    else:
        bad.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(WeightsError) as exc:
        build_dense_model(BACKBONE, "clip", weights=str(bad))
    assert str(bad) in str(exc.value)
    assert BACKBONE in str(exc.value)


def test_missing_weights_file_is_a_weights_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(WeightsError, match="no such file"):
        build_dense_model(BACKBONE, "clip", weights=str(missing))


# -- the local Hugging Face cache ----------------------------------------------------------------
def _fake_hf_cache(hub: Path, repo_dir: str, filename: str, payload: bytes, revision: str) -> Path:
    """The layout huggingface_hub writes: blobs/<etag>, snapshots/<rev>/<file> -> blob, refs/main = <rev>."""
    repo = hub / repo_dir
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    blob = repo / "blobs" / hashlib.sha256(payload).hexdigest()
    blob.write_bytes(payload)
    (repo / "refs" / "main").write_text(revision)  # no trailing newline, as huggingface_hub writes it
    target = snap / filename
    try:
        os.symlink(os.path.relpath(blob, snap), target)
    except OSError:  # pragma: no cover - filesystems without symlinks: huggingface_hub copies instead
        target.write_bytes(payload)
    return target


def test_resolve_weights_finds_the_hf_cache_without_network(tmp_path):
    spec = get_backbone_spec(BACKBONE)
    hub = tmp_path / "hf" / "hub"
    assert hf_cache_dir() == str(hub)
    with pytest.raises(WeightsError):  # empty cache, no download allowed
        resolve_weights(spec, None, allow_download=False)
    buf = tmp_path / "sd.pt"
    torch.save({"positional_embedding": torch.zeros(197, 768)}, buf)
    revision = "0123456789abcdef0123456789abcdef01234567"
    target = _fake_hf_cache(hub, "models--timm--vit_base_patch16_clip_224.openai", "open_clip_pytorch_model.bin",
                            buf.read_bytes(), revision)
    # huggingface_hub also caches "file does not exist" markers; the lookup must skip them
    (hub / "models--timm--vit_base_patch16_clip_224.openai" / ".no_exist" / revision).mkdir(parents=True)
    (hub / "models--timm--vit_base_patch16_clip_224.openai" / ".no_exist" / revision /
     "open_clip_model.safetensors").touch()
    found = resolve_weights(spec, None, allow_download=False)
    assert os.path.samefile(found, target)
    assert os.path.samefile(find_local_weights(spec), target)
    # an explicit --weights file wins over the cache
    assert resolve_weights(spec, str(buf), allow_download=False) == str(buf)


def test_hf_cache_dir_falls_back_to_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    assert hf_cache_dir() == str(tmp_path / "hf" / "hub")
    monkeypatch.delenv("HF_HOME")
    assert hf_cache_dir() == str(tmp_path / "home" / ".cache" / "huggingface" / "hub")


def test_openai_url_cache_is_found(tmp_path):
    spec = get_backbone_spec(BACKBONE)
    clip_dir = tmp_path / "home" / ".cache" / "clip"
    clip_dir.mkdir(parents=True)
    f = clip_dir / os.path.basename(spec.url)
    f.write_bytes(b"x")
    assert resolve_weights(spec, None, allow_download=False) == str(f)


# -- positional-embedding interpolation ----------------------------------------------------------
def test_pos_embed_native_grid_is_unchanged(random_model):
    pos = random_model.backbone.visual.positional_embedding[1:]
    m = int(math.isqrt(pos.shape[0]))
    assert m == 14
    out = interpolate_patch_pos_embed(pos, (m, m))
    assert torch.equal(out, pos)


@pytest.mark.parametrize("grid", [(13, 20), (21, 14), (7, 9), (28, 28)])
def test_pos_embed_matches_dino_style_bicubic(grid):
    g = torch.Generator().manual_seed(0)
    m, d = 14, 32
    pos = torch.randn(m * m, d, generator=g)
    h, w = grid
    img = pos.reshape(1, m, m, d).permute(0, 3, 1, 2)
    ref = F.interpolate(img, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic", align_corners=False)
    assert ref.shape[-2:] == (h, w)
    ref = ref.permute(0, 2, 3, 1).reshape(h * w, d)
    out = interpolate_patch_pos_embed(pos, grid)
    assert out.shape == (h * w, d)
    assert (out - ref).abs().max().item() < 1e-6
    if grid != (m, m):  # the +0.1 offset matters: a plain size= resize gives other values
        plain = F.interpolate(img, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        assert (out - plain.reshape(h * w, d)).abs().max().item() > 1e-4


def test_pos_embed_rejects_non_square_table():
    with pytest.raises(ValueError, match="square"):
        interpolate_patch_pos_embed(torch.zeros(195, 8), (13, 15))


# -- text tower ---------------------------------------------------------------------------------
PROMPTS = [
    "a photo of a dog.",
    "a.",
    "a bad photo of a television monitor.",
    "a photo of many person in shirt, person in jeans and a very long list of further things that the image has.",
    "itap of the wood .  a close-up photo.",
]


def test_encode_text_shortcut_equals_full_77_token_pass(random_model):
    bb = random_model.backbone
    tokens = bb.tokenize(PROMPTS)
    assert tokens.shape == (len(PROMPTS), 77)
    lengths = (tokens != 0).sum(-1)
    assert len(set(lengths.tolist())) == len(PROMPTS)  # really different lengths
    with torch.no_grad():
        ours = bb.encode_text(tokens)
        full = bb.model.encode_text(tokens)
        alone = {i: bb.encode_text(tokens[i:i + 1])[0] for i in (1, 3)}  # shortest and longest prompt
    assert ours.shape == (len(PROMPTS), 512)
    assert (ours - full).abs().max().item() < 1e-5
    for i, e in alone.items():  # cut at the prompt's own length
        assert (e - full[i]).abs().max().item() < 1e-5


def test_tokenizer_is_open_clips(random_model):
    import open_clip

    assert torch.equal(random_model.backbone.tokenize(PROMPTS), open_clip.tokenize(PROMPTS))


# -- random init --------------------------------------------------------------------------------
def test_random_init_is_reproducible_and_leaves_the_global_rng_alone(random_model, x):
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    other = build_dense_model(BACKBONE, "clip", random_init=True)
    assert torch.equal(torch.rand(3), expected_next)  # the build forks the RNG
    sd_a, sd_b = random_model.backbone.model.state_dict(), other.backbone.model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    with torch.no_grad():
        assert torch.equal(random_model.forward_dense(x).patch, other.forward_dense(x).patch)
