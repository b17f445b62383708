"""The pieces of ``harness viz`` against independent references: the joint PCA (numpy SVD), the colour
stretch, the query heatmap and segmentation (numpy cosine and argmax), the VOC palette (its known colours),
the figure size, the page, and the option errors."""
from __future__ import annotations

import os
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from harness.errors import ConfigError
from harness.viz import figure as vfig
from harness.viz.features import view_size
from harness.viz.page import write_index
from harness.viz.projection import UMAP_MISSING, fit_pca, joint_colours, stretch, umap_embed, unit_tokens
from harness.viz.render import figure_name
from harness.viz.text import default_query, query_map, resolve_names, segment


def _numpy_pca_colours(maps):
    """Reference: unit tokens, SVD of the centred joint matrix, sign by largest loading, 1-99 percentile stretch."""
    toks = []
    for m in maps:
        x = m.numpy().astype(np.float64).reshape(m.shape[0], -1).T
        toks.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    allt = np.concatenate(toks)
    centred = allt - allt.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:3]
    for i in range(3):
        if axes[i, np.abs(axes[i]).argmax()] < 0:
            axes[i] = -axes[i]
    coords = centred @ axes.T
    lo, hi = np.percentile(coords, 1, axis=0), np.percentile(coords, 99, axis=0)
    rgb = np.clip((coords - lo) / (hi - lo), 0, 1)
    out, start = [], 0
    for m in maps:
        n = m.shape[1] * m.shape[2]
        out.append(rgb[start:start + n].reshape(m.shape[1], m.shape[2], 3))
        start += n
    return out


def test_joint_pca_matches_a_numpy_svd_reference() -> None:
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(16, 5, 7, generator=g) * s for s in (1.0, 30.0, 0.01)]  # very different scales
    ours = joint_colours(maps, "pca")
    ref = _numpy_pca_colours(maps)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-9)


def test_identical_features_of_two_methods_get_the_same_colours() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(32, 6, 6, generator=g)
    b = torch.randn(32, 6, 6, generator=g) + 2.0  # a third method that moves the joint fit
    colours = joint_colours([a, a.clone(), b], "pca")
    np.testing.assert_array_equal(colours[0], colours[1])
    assert not np.allclose(colours[0], colours[2])
    # the fit is joint: alone, ``a`` gets other colours than beside ``b``
    assert not np.allclose(joint_colours([a], "pca")[0], colours[0])


def test_pca_axes_are_orthonormal_and_sign_fixed() -> None:
    x = np.random.default_rng(2).normal(size=(200, 10))
    mean, axes = fit_pca(x)
    np.testing.assert_allclose(axes @ axes.T, np.eye(3), atol=1e-10)
    assert all(row[np.abs(row).argmax()] > 0 for row in axes)
    np.testing.assert_allclose(mean, x.mean(0))


def test_stretch_maps_the_percentiles_to_0_and_1() -> None:
    c = np.arange(101, dtype=np.float64)[:, None].repeat(2, 1)
    s = stretch(c, (10.0, 90.0))
    assert s[10, 0] == 0 and s[90, 1] == 1 and s[0, 0] == 0 and s[100, 0] == 1
    assert s[50, 0] == pytest.approx(0.5)


def test_unit_tokens_are_row_major_and_unit_norm() -> None:
    p = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3) + 1
    t = unit_tokens(p)
    assert t.shape == (6, 2)
    ref = p[:, 0, 1].numpy()  # token 1 = row 0, column 1
    np.testing.assert_allclose(t[1], ref / np.linalg.norm(ref))


def test_umap_missing_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'harness\[viz\]'"):
        umap_embed(np.zeros((5, 4)))
    assert "harness[viz]" in UMAP_MISSING


def test_unknown_projection_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown projection 'tsne'"):
        joint_colours([torch.zeros(3, 2, 2)], "tsne")


def test_query_map_is_the_cosine_with_the_query() -> None:
    g = torch.Generator().manual_seed(3)
    patch, q = torch.randn(8, 3, 4, generator=g), torch.randn(8, generator=g)
    q = q / q.norm()
    x = patch.numpy().reshape(8, -1)
    ref = (x / np.linalg.norm(x, axis=0)).T @ q.numpy()
    np.testing.assert_allclose(query_map(patch, q).numpy().reshape(-1), ref, atol=1e-6)


def test_segment_takes_the_best_query_of_each_class() -> None:
    # 2 x 1 grid, classes: 0 with one query, 1 with two; channel i of the features = cosine with query i
    patch = torch.tensor([[[1.0], [0.0]], [[0.0], [0.2]], [[0.1], [1.0]]])  # (C=3, h=2, w=1)
    queries = torch.eye(3)
    query_class = torch.tensor([0, 1, 1])
    seg = segment(patch, queries, query_class, 2, (2, 1), logit_scale=40.0)
    assert seg.tolist() == [[0], [1]]  # token 0 is query 0 (class 0); token 1 is query 2 (class 1)


def test_default_query_skips_the_background_line() -> None:
    assert default_query([["sky", "wall"], ["aeroplane"], ["bicycle"]]) == "a photo of a aeroplane."
    assert default_query([["cat"]]) == "a photo of a cat."


def test_names_from_a_key_or_a_file(tmp_path) -> None:
    label, names = resolve_names("voc21", "sclip")
    assert label == "voc21" and len(names) == 21 and names[15][0] == "person"
    f = tmp_path / "mine.txt"
    f.write_text("background\ncat, kitten\n\n")
    assert resolve_names(str(f), "sclip") == ("mine.txt", [["background"], ["cat", "kitten"]])
    with pytest.raises(ConfigError, match="--names nonsense: neither a file nor a name set key.*voc21"):
        resolve_names("nonsense", "sclip")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ConfigError, match="names no class"):
        resolve_names(str(tmp_path / "empty.txt"), "sclip")


def test_voc_palette_known_colours() -> None:
    # PASCAL VOC 2012 colour map: background black, aeroplane (128,0,0), bicycle (0,128,0), bird (128,128,0),
    # person (192,128,128), tvmonitor (0,64,128)
    pal = vfig.voc_palette(21)
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[2].tolist() == [0, 128, 0]
    assert pal[3].tolist() == [128, 128, 0] and pal[15].tolist() == [192, 128, 128] and pal[20].tolist() == [0, 64, 128]
    assert len({tuple(c) for c in vfig.voc_palette(256)}) == 256


def test_view_size_keeps_the_short_side_on_the_patch_grid() -> None:
    assert view_size(320, 240, 448, 16) == (592, 448)
    assert view_size(100, 100, 64, 14) == (70, 70)  # 64/14 -> 5 patches
    w, h = view_size(1000, 300, 224, 16)
    assert h == 224 and w % 16 == 0 and abs(w / h - 1000 / 300) < 0.05


def test_figure_size_is_what_render_writes(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(4)
    cols = [vfig.MethodColumn(method=m, colours=rng.random((4, 6, 3)), norms=rng.random((4, 6)),
                              outliers={"high": 0.1, "low": 0.0}, query=rng.random((32, 48)),
                              segmentation=rng.integers(0, 3, (32, 48))) for m in ("a", "b", "c")]
    fig = vfig.ImageFigure(title="x.jpg", rgb=(rng.random((32, 48, 3)) * 255).astype(np.uint8), columns=cols,
                           query="a photo of a cat", class_names=["background", "cat", "dog"])
    path = str(tmp_path / "x.png")
    size = vfig.render_figure(fig, path)
    assert size == vfig.figure_size(3, True, 3)
    with Image.open(path) as im:
        assert im.size == size
    no_text = vfig.ImageFigure(title="y", rgb=fig.rgb, columns=[vfig.MethodColumn("a", cols[0].colours,
                                                                                   cols[0].norms, {})])
    assert vfig.render_figure(no_text, str(tmp_path / "y.png")) == vfig.figure_size(1, False)
    assert vfig.figure_size(1, False)[1] < vfig.figure_size(1, True, 3)[1]


def test_legend_room_is_capped() -> None:
    assert vfig.legend_lines(2, 0) == 0
    few, many = vfig.legend_lines(2, 5), vfig.legend_lines(2, 171)
    assert few == -(-5 // vfig.legend_columns(2))
    assert many == -(-vfig.LEGEND_MAX // vfig.legend_columns(2)) + 1


def test_figure_names_are_unique(tmp_path) -> None:
    root = str(tmp_path)
    taken: set = set()
    names = [figure_name(os.path.join(root, p), root, taken) for p in ("a.jpg", "a.png", "sub/a.jpg")]
    assert names == ["a.png", "a-1.png", "sub__a.png"]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.src: list = []
        self.href: list = []

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        if tag == "img":
            self.src.append(a["src"])
        if tag == "a":
            self.href.append(a["href"])


def test_index_links_are_relative_and_escaped(tmp_path) -> None:
    from urllib.parse import unquote

    sub = tmp_path / "my figs"
    sub.mkdir()
    png = sub / "a&b.png"
    png.write_bytes(b"x")
    path = write_index(str(tmp_path), [("a&b <img>", str(png))], [("query", "<script>")], note="random")
    text = open(path, encoding="utf-8").read()
    assert "<script>" not in text and "http" not in text
    p = _Links()
    p.feed(text)
    assert p.src == p.href == ["my%20figs/a%26b.png"]
    assert os.path.isfile(os.path.join(str(tmp_path), unquote(p.src[0])))
