"""``harness viz`` end to end on the demo data (random-init CLIP ViT-B/16, two methods): one PNG of the
expected size per image, not constant, and an index page that lists every PNG; the same with ``--umap``
on the small planted-artifact CLIP; the page in a headless browser when one is installed."""
from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from urllib.parse import unquote

import numpy as np
import pytest

from harness.cli import main
from harness.synthetic.segmentation import write_demo_voc
from harness.viz.figure import figure_size

NAMES = "background\ncat\n"  # two classes keep the text tower's 80-template encoding short on CPU


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list = []
        self.text: list = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "img":
            self.images.append(unquote(dict(attrs)["src"]))

    def handle_data(self, data) -> None:
        self.text.append(data)


def _viz(tmp_path, backbone: str, methods: str, *extra: str):
    root = write_demo_voc(str(tmp_path / "data"), num_images=2, size=(64, 96), seed=3)
    images = os.path.join(root, "JPEGImages")
    names = tmp_path / "names.txt"
    names.write_text(NAMES)
    out = tmp_path / "viz"
    rc = main(["viz", "--backbone", backbone, "--random-init", "--method", methods, "--images", images,
               "--out", str(out), "--names", str(names), "--resolution", "64", "--device", "cpu",
               "--cache-dir", str(tmp_path / "cache"), "--no-progress", *extra])
    assert rc == 0
    return images, out


def _check_outputs(images: str, out, num_methods: int, methods=()) -> _Page:
    from PIL import Image

    page = _Page()
    page.feed((out / "index.html").read_text(encoding="utf-8"))
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(images))
    assert sorted(os.path.splitext(p)[0] for p in page.images) == stems  # one figure per image, all listed
    for src in page.images:
        assert not os.path.isabs(src) and "://" not in src
        path = out / src
        assert path.is_file()
        with Image.open(path) as im:
            assert im.size == figure_size(num_methods, True, 2)
            arr = np.asarray(im.convert("RGB"))
        assert arr.std() > 0 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 50  # a picture, not a blank
    text = " ".join(page.text)
    for m in methods:
        assert m in text
    return page


def test_viz_on_demo_data_writes_a_figure_per_image_and_the_index(tmp_path) -> None:
    images, out = _viz(tmp_path, "clip-b16-openai", "clip,maskclip", "--query", "a photo of a cat")
    page = _check_outputs(images, out, 2, methods=("vanilla", "maskclip", "a photo of a cat", "PCA"))
    assert "random-init" in " ".join(page.text)


@pytest.mark.slow  # umap-learn's numba functions compile on first use: ~35 s of CPU before any work
def test_viz_umap(tmp_path) -> None:
    images, out = _viz(tmp_path, "test-planted-clip", "clip,maskclip,naclip", "--umap")
    _check_outputs(images, out, 3, methods=("UMAP", "naclip", "a photo of a cat."))


def test_viz_bad_options_give_one_clear_error(tmp_path, capsys) -> None:
    assert main(["viz", "--backbone", "test-planted-clip", "--random-init", "--images", str(tmp_path / "none"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--images" in err and "no such folder" in err
    root = write_demo_voc(str(tmp_path / "data"), num_images=1, size=(32, 32))
    assert main(["viz", "--backbone", "test-planted-clip", "--random-init", "--images", root, "--out",
                 str(tmp_path / "o"), "--names", "nonsense", "--no-progress"]) == 2
    assert "--names nonsense" in capsys.readouterr().err


def _browser():
    try:
        import playwright.sync_api  # noqa: F401

        return "playwright"
    except ImportError:
        pass
    for exe in ("chromium", "chromium-browser", "google-chrome", "firefox"):
        if shutil.which(exe):
            return exe
    return None


@pytest.mark.skipif(_browser() is None, reason="no headless browser (playwright, chromium or firefox) installed")
def test_index_page_loads_in_a_headless_browser(tmp_path) -> None:
    root = write_demo_voc(str(tmp_path / "data"), num_images=2, size=(32, 48))
    out = tmp_path / "viz"
    assert main(["viz", "--backbone", "test-planted-clip", "--random-init", "--method", "clip,maskclip", "--images",
                 os.path.join(root, "JPEGImages"), "--out", str(out), "--resolution", "32", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    url = (out / "index.html").as_uri()
    browser = _browser()
    if browser == "playwright":
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            b = p.chromium.launch()
            page = b.new_page()
            page.goto(url)
            loaded = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
            b.close()
        assert loaded == [True, True]
        return
    if browser == "firefox":
        shot = tmp_path / "shot.png"
        subprocess.run([browser, "--headless", "--screenshot", str(shot), url], check=True, timeout=120,
                       capture_output=True)
        assert shot.is_file() and shot.stat().st_size > 0
        return
    dom = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom", url], check=True,
                         timeout=120, capture_output=True, text=True).stdout
    page_ = _Page()
    page_.feed(dom)
    assert len(page_.images) == 2
