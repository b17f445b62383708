"""``index.html``: every figure of a run on one page, with relative links and no external assets, so the
folder can be copied, zipped or opened from disk as it is."""
from __future__ import annotations

import html
import os
from typing import Sequence, Tuple
from urllib.parse import quote

STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:100%}table{border-collapse:collapse;margin-bottom:1em}"
         "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}img{max-width:100%;height:auto}"
         ".note{color:#b22222;font-weight:bold}section{margin-bottom:2em}")


def write_index(out_dir: str, figures: Sequence[Tuple[str, str]], settings: Sequence[Tuple[str, str]],
                title: str = "harness viz", note: str = "") -> str:
    """Write ``out_dir/index.html`` listing ``figures`` ((caption, PNG path under out_dir)) and return its path.

    ``settings`` are (name, value) rows shown above the figures (backbone, weights, methods, query ...).
    """
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in settings)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    if note:
        parts.append(f"<p class=\"note\">{esc(note)}</p>")
    parts.append(f"<table>{rows}</table>")
    for caption, png in figures:
        rel = os.path.relpath(os.path.abspath(png), os.path.abspath(out_dir)).replace(os.sep, "/")
        href = esc(quote(rel), quote=True)  # percent-encode spaces etc., then HTML-escape
        parts.append(f"<section><h2>{esc(caption)}</h2><a href=\"{href}\"><img src=\"{href}\" "
                     f"alt=\"{esc(caption, quote=True)}\"></a></section>")
    parts.append("</body></html>\n")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
