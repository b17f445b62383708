"""Every source the repository cites is public: a paper (authors + arXiv id) or a repository at a commit.

Why: a number or constant is only checkable by a user if its source is something they can open. Notes kept
outside the repository (a ``shared/`` folder, research notes such as ``ovss.md``, saved paper texts under
``seeds/``) are not, so they must never be cited, in the published-number files or anywhere else.
"""
from __future__ import annotations

import os
import re
from typing import Iterator, List, Tuple

import pytest

from harness.results.published import load_published

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: an arXiv identifier (new-style, yymm.number)
ARXIV = re.compile(r"\barXiv:\d{4}\.\d{4,5}\b")
#: "Surname, Surname Two, Surname." or "Surname et al." opening a citation
AUTHORS = re.compile(r"^[A-Z][\w'-]+(?: [A-Z][\w'-]+)*(?:, [A-Z][\w'-]+(?: [A-Z][\w'-]+)*)*(?: et al)?\. \S")
#: github.com/owner/name, optionally a file or section, then "@ <commit>"
REPO_AT_COMMIT = re.compile(r"github\.com/[\w.-]+/[\w.-]+(?: [\w ./-]+)? @ [0-9a-f]{7,40}\b")
#: what an internal note looks like: the notes' folders, their file names, or "<file>.md §<section>"
NOTE_NAMES = ("ovss.md", "probes.md", "phreg-dvt.md", "refiners.md", "style.md")
INTERNAL = re.compile(r"shared/|seeds/|\.md\s*§|" + "|".join(re.escape(n) for n in NOTE_NAMES))

#: the arXiv id of each `paper` key of results/published (read off each paper's arXiv page / repository README)
PAPER_ARXIV = {
    "phreg": "2505.21501",  # Chen et al., Vision Transformers with Self-Distilled Registers, NeurIPS 2025
    "dvt": "2401.02957",  # Yang et al., Denoising Vision Transformers, ECCV 2024
    "sclip": "2312.01597",  # Wang et al., SCLIP, ECCV 2024 (wangf3014/SCLIP README)
    "clearclip": "2407.12442",  # Lan et al., ClearCLIP, ECCV 2024 (mc-lan/ClearCLIP README)
    "naclip": "2404.08181",  # Hajimiri et al., NACLIP, WACV 2025 (sinahmr/NACLIP README)
}

#: folders and files whose text must not mention internal notes (tests/ too, except this file)
SCANNED = ("harness", "configs", "benchmarks", "results", "README.md", "tests")
SKIP_DIRS = {"__pycache__", ".git", ".pytest_cache", "runs", "cache"}


def is_public_citation(text: str) -> bool:
    """Authors + arXiv id, or a repository at a commit; and nothing that points at an internal note."""
    paper = bool(AUTHORS.search(text) and ARXIV.search(text))
    return (paper or bool(REPO_AT_COMMIT.search(text))) and not INTERNAL.search(text)


def test_checker_accepts_public_and_rejects_internal_citations() -> None:
    assert is_public_citation("Wang, Mei, Yuille. SCLIP: Rethinking Self-Attention. ECCV 2024, arXiv:2312.01597")
    assert is_public_citation("Yang et al. Denoising Vision Transformers. ECCV 2024, arXiv:2401.02957")
    assert is_public_citation("github.com/sinahmr/NACLIP README @ 0cac3a6")
    assert not is_public_citation("shared/reference/ovss.md §3 (reported mIoU); NACLIP paper main table")
    assert not is_public_citation("Chen et al. PH-Reg. arXiv:2505.21501. Text: shared/seeds/002_d643db7010c8da7c.txt")
    assert not is_public_citation("Chen et al. PH-Reg. arXiv:2505.21501, as recorded in phreg-dvt.md §3")
    assert not is_public_citation("SCLIP paper main table via secondary sources")  # no authors, id or commit
    assert not is_public_citation("Vision Transformers with Self-Distilled Registers, arXiv:2505.21501")  # no authors
    assert not is_public_citation("github.com/sinahmr/NACLIP README")  # no commit


def test_every_published_citation_is_public() -> None:
    df = load_published()
    bad = sorted({c for c in df["citation"] if not is_public_citation(c)})
    assert not bad, "citations that are not public (authors + arXiv id, or repository @ commit):\n" + "\n".join(bad)
    assert not [t for t in df["table"] if INTERNAL.search(t)]
    assert not [n for n in df["notes"].fillna("") if INTERNAL.search(n)]


def test_each_paper_cites_its_own_arxiv_id() -> None:
    df = load_published()
    assert set(df["paper"]) <= set(PAPER_ARXIV)
    for paper, cit in zip(df["paper"], df["citation"]):
        assert ARXIV.findall(cit) == [f"arXiv:{PAPER_ARXIV[paper]}"], (paper, cit)


def _text_files(root: str) -> Iterator[Tuple[str, str]]:
    if os.path.isfile(root):
        yield root, os.path.relpath(root, REPO)
        return
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
        for fn in files:
            p = os.path.join(d, fn)
            yield p, os.path.relpath(p, REPO)


@pytest.mark.parametrize("top", SCANNED)
def test_no_file_mentions_internal_notes(top: str) -> None:
    this = os.path.abspath(__file__)
    hits: List[str] = []
    for path, rel in _text_files(os.path.join(REPO, top)):
        if os.path.abspath(path) == this:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (UnicodeDecodeError, OSError):
            continue  # binary files (images, weights) hold no citations
        hits += [f"{rel}:{i}: {ln.strip()[:100]}" for i, ln in enumerate(lines, 1)
                 if INTERNAL.search(ln) or "../shared" in ln]
    assert not hits, "cite the paper or repository@commit instead of internal notes:\n" + "\n".join(hits)
