"""The template set is open_clip's 80 OpenAI ImageNet prompts, identical to SCLIP's list."""
from __future__ import annotations

import subprocess
import sys

import pytest

from harness.errors import ConfigError
from harness.text.templates import TEMPLATE_SETS, render, template_set_hash

# copied from wangf3014/SCLIP prompts/imagenet_template.py::openai_imagenet_template
# (commit 73446ae4fe18812847da7e90be47fb646f68331e): positions 0-4, 32, 39 and 77-79 of 80
SCLIP_EXCERPT = {
    0: "a bad photo of a {c}.",
    1: "a photo of many {c}.",
    2: "a sculpture of a {c}.",
    3: "a photo of the hard to see {c}.",
    4: "a low resolution photo of the {c}.",
    32: "a photo of the {c}.",
    39: "a photo of a {c}.",
    77: "a photo of a cool {c}.",
    78: "a photo of a small {c}.",
    79: "a tattoo of the {c}.",
}


def test_eighty_templates_matching_sclip_excerpt() -> None:
    t = TEMPLATE_SETS["openai_imagenet_80"]
    assert len(t) == 80 and len(set(t)) == 80
    for i, s in SCLIP_EXCERPT.items():
        assert t[i] == s.replace("{c}", "{}"), i


def test_render_equals_open_clip_lambdas() -> None:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    for name in ("wood ", "television monitor", "person in shirt", "a{b}c"):
        assert render("openai_imagenet_80", name) == [f(name) for f in OPENAI_IMAGENET_TEMPLATES]


def test_name_is_inserted_verbatim() -> None:
    assert render("openai_imagenet_80", "wood ")[39] == "a photo of a wood ."


def test_hash_is_stable_and_short() -> None:
    h = template_set_hash("openai_imagenet_80")
    assert h == template_set_hash("openai_imagenet_80") and len(h) == 16
    int(h, 16)


def test_unknown_template_set() -> None:
    with pytest.raises(ConfigError, match="known: .*openai_imagenet_80"):
        render("nope", "cat")
    with pytest.raises(ConfigError):
        template_set_hash("nope")


def test_importing_templates_does_not_import_torch() -> None:
    code = "import sys, harness.text.templates; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_package_exports_templates_lazily() -> None:
    import harness.text as text

    assert text.render is render and text.TEMPLATE_SETS is TEMPLATE_SETS
    with pytest.raises(AttributeError):
        text.nope  # noqa: B018
