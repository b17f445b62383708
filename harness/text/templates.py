"""Prompt templates: the 80 OpenAI ImageNet templates that SCLIP, ClearCLIP, NACLIP and PH-Reg average over.

The list is taken from open_clip (``open_clip/zero_shot_metadata.py::OPENAI_IMAGENET_TEMPLATES``), which
holds the same 80 strings, in the same order, as ``prompts/imagenet_template.py::openai_imagenet_template``
in wangf3014/SCLIP@b56bd30 (checked by tests/text/test_templates.py). The file is
loaded on its own, without executing ``open_clip/__init__`` (which imports torch), so that building a
cache key or listing prompts stays cheap.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Callable, Dict, List, Sequence

from ..errors import ConfigError

#: placeholder used to turn open_clip's ``lambda c: f'...{c}...'`` templates into format strings
_SLOT = "{}"


def _openai_imagenet_templates() -> List[str]:
    """open_clip's ``OPENAI_IMAGENET_TEMPLATES`` as ``str.format`` strings (``'a photo of a {}.'``)."""
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the prompt templates come from open_clip, which is not installed: "
                          "pip install open_clip_torch")
    path = os.path.join(list(spec.submodule_search_locations)[0], "zero_shot_metadata.py")
    mod_spec = importlib.util.spec_from_file_location("_harness_open_clip_zero_shot_metadata", path)
    if mod_spec is None or mod_spec.loader is None:
        raise ConfigError(f"cannot load open_clip's template list from {path}")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    templates: Sequence[Callable[[str], str]] = module.OPENAI_IMAGENET_TEMPLATES
    out = [t(_SLOT) for t in templates]
    if len(out) != 80:
        raise ConfigError(f"open_clip at {path} lists {len(out)} OpenAI ImageNet templates, expected 80")
    return out


#: template-set name -> format strings with one ``{}`` slot for the class name
TEMPLATE_SETS: Dict[str, List[str]] = {
    "openai_imagenet_80": _openai_imagenet_templates(),
    # GEM's single prompt "a photo of a {}." (WalBouss/GEM@5fa677c); also a cheap set for CPU tests
    "gem_single": ["a photo of a {}."],
}


def _get(template_set: str) -> List[str]:
    if template_set not in TEMPLATE_SETS:
        raise ConfigError(f"unknown template set {template_set!r}; known: {', '.join(sorted(TEMPLATE_SETS))}")
    return TEMPLATE_SETS[template_set]


def render(template_set: str, name: str) -> List[str]:
    """All prompts of ``template_set`` for one class name (the name is inserted verbatim, spaces included)."""
    return [t.format(name) for t in _get(template_set)]


def template_set_hash(template_set: str) -> str:
    """Short stable hash of a template set's strings, so cached text embeddings change when prompts do."""
    blob = json.dumps([template_set, _get(template_set)], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
