"""Text side of zero-shot segmentation: class-name files and prompt templates, both kept as data.

Name files are copied byte-for-byte from the method repositories (quirks included) because the exact
strings fed to the text encoder move mIoU; templates are the 80 OpenAI ImageNet prompts every
SCLIP-lineage repository averages over. The template names are resolved on first use, so reading a
name file never depends on open_clip being importable.
"""
from typing import Any

from .names import available_name_sets, check_class_count, load_name_set, name_file_path, parse_name_lines

_TEMPLATE_NAMES = ("TEMPLATE_SETS", "render", "template_set_hash")

__all__ = [
    "TEMPLATE_SETS",
    "available_name_sets",
    "check_class_count",
    "load_name_set",
    "name_file_path",
    "parse_name_lines",
    "render",
    "template_set_hash",
]


def __getattr__(name: str) -> Any:
    if name in _TEMPLATE_NAMES:
        from . import templates

        return getattr(templates, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
