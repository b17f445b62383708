"""Every ``harness ...`` command we print exists: it parses with :func:`harness.cli.build_parser`.

Where commands are collected:

* ``README.md``: lines of fenced code blocks that start with ``harness`` (with ``\\`` continuations; a
  trailing ``# comment`` is dropped), and every inline code span that starts with ``harness``;
* ``harness/protocols/**/*.yaml`` and ``configs/*.yaml``: every mention in the raw text (comments too);
* ``--help`` texts: the description, epilog and help of every parser and subparser and of every option;
* ``harness/**/*.py``: every string literal (docstrings, messages, f-strings) with a mention.

A *mention* is ``harness <subcommand>`` (``run``, ``suite``, ``ttr``, ``distill``, ``list``, ``data``,
``report``, ``demo``). Inside backticks it runs to the closing backtick; in running text it runs as long
as the words fit the parser: subcommand names, options (anything starting with ``--``), the values they
take and the positionals the parser still expects; the first word that fits nothing ends it (``harness
data prepare context needs --json`` is the command ``harness data prepare context``).

How a mention becomes argv:

* ``A|B|C`` (``\\|`` in markdown tables) is a choice: each alternative is checked;
* ``[...]`` marks an optional part: it is kept, without the brackets; ``X[,X...]`` is ``X``; a ``...`` word
  (and a trailing ``...``) means "more options" and is dropped; ``--a/--b`` names two options;
* placeholders (``ID``, ``DIR``, ``FILE``, ``ROOT``, ``N``, ``STUDENT.pth``, ``<backbone>``, an f-string
  field ...) stand for any value: where the parser wants a number they become ``1``, where it wants one of
  its choices they become the first choice, otherwise they are passed as they are;
* a mention in backticks or running text may leave out required arguments (``run `harness data prepare
  nyu` first``): they are filled with dummies, so only the words it does give are checked; a README code
  block line is a full command and is parsed as written;
* ``--help`` is allowed anywhere (it is removed before parsing); abbreviated options (argparse would take
  ``--results`` for ``--results-dir``) are not: a printed command names options in full.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import glob
import io
import os
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import pytest

from harness.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUBCOMMANDS = ("run", "suite", "ttr", "distill", "list", "data", "report", "demo", "sensitivity")
MENTION = re.compile(r"(?<![\w.\-/])harness\s+(?:%s)\b" % "|".join(SUBCOMMANDS))
FIELD = "\x00"  # an f-string field inside a literal
PLACEHOLDER = re.compile(r"^(<[^>]*>|[A-Z][A-Z0-9_]*(\.[A-Za-z0-9]+)?|[^\s]*\x00[^\s]*)$")


@dataclass(frozen=True)
class Mention:
    """A command found in ``where`` (file:line or help location); ``full``: parse as written, no filling."""

    text: str
    where: str
    full: bool = False


# -- collecting -------------------------------------------------------------------------------------


def _mentions_in_text(text: str, where: str) -> Iterator[Mention]:
    """Mentions in a piece of prose (a line, a help text, a string literal)."""
    for m in MENTION.finditer(text):
        start = m.start()
        ticks = len(text[:start]) - len(text[:start].rstrip("`"))
        if ticks:  # inside a code span: up to the matching closing backticks
            end = text.find("`" * ticks, m.end())
            yield Mention(text[start:end if end >= 0 else len(text)], where)
        else:
            line_end = text.find("\n", start)
            yield Mention(text[start:line_end if line_end >= 0 else len(text)], where + " (running text)")


def readme_mentions() -> List[Mention]:
    path = os.path.join(ROOT, "README.md")
    lines = open(path, encoding="utf-8").read().splitlines()
    out: List[Mention] = []
    in_block, i = False, 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_block = not in_block
            i += 1
            continue
        if in_block:
            if line.strip().startswith("harness "):
                start, cmd = i, line.strip()
                while cmd.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    cmd = cmd[:-1] + " " + lines[i].strip()
                cmd = re.sub(r"\s#\s.*$", "", cmd)
                out.append(Mention(cmd, f"README.md:{start + 1} (code block)", full=True))
        else:
            for span in re.finditer(r"(`+)(harness\s.*?)\1", line):
                out.append(Mention(span.group(2), f"README.md:{i + 1}"))
            prose = re.sub(r"(`+).*?\1", " ", line)
            out += list(_mentions_in_text(prose, f"README.md:{i + 1}"))
        i += 1
    return out


def yaml_mentions() -> List[Mention]:
    files = sorted(glob.glob(os.path.join(ROOT, "harness", "protocols", "*", "*.yaml"))
                   + glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    out: List[Mention] = []
    for path in files:
        rel = os.path.relpath(path, ROOT)
        for n, line in enumerate(open(path, encoding="utf-8"), 1):
            out += list(_mentions_in_text(line, f"{rel}:{n}"))
    return out


def _literal_text(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else FIELD for v in node.values)
    return None


def source_mentions() -> List[Mention]:
    out: List[Mention] = []
    for path in sorted(glob.glob(os.path.join(ROOT, "harness", "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, ROOT)
        tree = ast.parse(open(path, encoding="utf-8").read())
        inner = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in ast.walk(tree):
            if id(node) in inner:  # the constant parts of an f-string are read with it
                continue
            text = _literal_text(node)
            if text and "harness" in text:
                for k, line in enumerate(text.split("\n")):
                    out += list(_mentions_in_text(line, f"{rel}:{node.lineno + k}"))
    return out


@functools.lru_cache(maxsize=1)
def strict_parser() -> argparse.ArgumentParser:
    """``build_parser()`` without abbreviations: a printed ``--results`` must not pass for ``--results-dir``."""
    parser = build_parser()
    for _, p in _parsers(parser, "harness"):
        p.allow_abbrev = False
    return parser


def _parsers(parser: argparse.ArgumentParser, prog: str) -> Iterator[Tuple[str, argparse.ArgumentParser]]:
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


def help_mentions() -> List[Mention]:
    out: List[Mention] = []
    for prog, parser in _parsers(strict_parser(), "harness"):
        texts = {"description": parser.description, "epilog": parser.epilog}
        for action in parser._actions:
            name = "/".join(action.option_strings) or action.dest
            texts[f"help of {name}"] = action.help
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    texts[f"help of subcommand {choice.dest}"] = choice.help
        for what, text in texts.items():
            if text and text is not argparse.SUPPRESS:
                out += list(_mentions_in_text(text, f"`{prog} --help` {what}"))
    return out


# -- from a mention to argv -------------------------------------------------------------------------


def _clean(word: str) -> str:
    word = word.replace("\\|", "|").strip("[]'\"")
    word = re.sub(r"\[,[^\]]*\.\.\.\]?$", "", word)  # X[,X...] -> X
    return word.rstrip(".,;:)]") if not word.endswith("...") else word


def _split_quoted(text: str) -> List[str]:
    """Whitespace split that keeps a double-quoted argument (``--query "a photo of a cat"``) as one word."""
    return [a if a is not None and a != "" else b for a, b in re.findall(r'"([^"]*)"|(\S+)', text)]


def _words(text: str) -> List[str]:
    out = []
    for raw in _split_quoted(text.replace("\\|", "|")):
        w = _clean(raw)
        if not w or w == "..." or w.strip(".") == "":
            continue
        if w.startswith("--") and "/--" in w:  # --a/--b: two options
            out += w.split("/")
        elif w.endswith("...") and len(w) > 3:
            out.append(w[:-3])
        else:
            out.append(w)
    return out


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0 and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))


def _value_for(action: argparse.Action, word: str) -> str:
    """A placeholder turned into a value the action accepts; a real word unchanged."""
    if not PLACEHOLDER.match(word):
        return word
    if action.choices:
        return str(next(iter(action.choices)))
    if action.type in (int, float):
        return "1"
    return word.replace(FIELD, "x")


def to_argv(words: Sequence[str], full: bool, prose: bool) -> List[str]:
    """Walk the parser along ``words``: keep what fits (see module doc), fill missing required arguments."""
    parser = strict_parser()
    argv: List[str] = []
    i = 1  # words[0] == "harness"
    while True:
        positionals = [a for a in parser._actions if not a.option_strings]
        options = parser._option_string_actions
        sub: Optional[argparse.ArgumentParser] = None
        for pos in positionals:
            # options before this positional
            while i < len(words) and words[i].startswith("-"):
                name = words[i].split("=", 1)[0]
                argv.append(words[i])
                i += 1
                act = options.get(name)
                if act is not None and _takes_value(act) and "=" not in argv[-1]:
                    if i < len(words) and not words[i].startswith("--"):
                        argv.append(_value_for(act, words[i]))
                        i += 1
                    elif not full:
                        argv.append(_value_for(act, "X"))
            if i >= len(words):
                if not full:
                    argv.append(_value_for(pos, "X"))
                    if isinstance(pos, argparse._SubParsersAction):
                        sub = pos.choices[argv[-1]]
                    continue
                break
            word = words[i]
            fits = PLACEHOLDER.match(word) or not pos.choices or word in pos.choices
            if not fits and prose:
                words = words[:i]
                if not full:
                    argv.append(_value_for(pos, "X"))
                    if isinstance(pos, argparse._SubParsersAction):
                        sub = pos.choices[argv[-1]]
                    continue
                break
            argv.append(_value_for(pos, word))
            i += 1
            if isinstance(pos, argparse._SubParsersAction):
                sub = pos.choices.get(argv[-1])
                break
        if sub is None:
            break
        parser = sub
    # trailing options (and, in prose, the end of the mention at the first word that fits nothing)
    options = parser._option_string_actions
    while i < len(words):
        w = words[i]
        if not w.startswith("-"):
            if prose:
                break
            argv.append(w)
            i += 1
            continue
        argv.append(w)
        i += 1
        act = options.get(w.split("=", 1)[0])
        if act is not None and _takes_value(act) and "=" not in w:
            if i < len(words) and not words[i].startswith("--"):
                argv.append(_value_for(act, words[i]))
                i += 1
            elif not full:
                argv.append(_value_for(act, "X"))
    argv = [a for a in argv if a not in ("-h", "--help")]
    if not full:  # required options the mention left out
        for act in parser._actions:
            if act.required and act.option_strings and not any(o in argv for o in act.option_strings):
                argv += [act.option_strings[0], _value_for(act, "X")]
    return argv


def variants(text: str) -> List[List[str]]:
    """Every ``A|B`` choice in turn (the others at their first alternative)."""
    words = _words(text)
    alts = [w.split("|") if "|" in w and not w.startswith("-") else [w] for w in words]
    base = [a[0] for a in alts]
    out = [base]
    for k, a in enumerate(alts):
        for alt in a[1:]:
            out.append(base[:k] + [alt] + base[k + 1:])
    return out


def check(m: Mention) -> Optional[str]:
    """None when every variant of the mention parses, else the failure naming the source and the argv."""
    prose = m.where.endswith("(running text)")
    for words in variants(m.text):
        argv = to_argv(words, m.full, prose)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                strict_parser().parse_args(argv)
        except SystemExit as e:
            if e.code:
                last = (err.getvalue().strip().splitlines() or ["?"])[-1]
                return f"{m.where}: `{m.text.strip()}` does not parse (as `harness {' '.join(argv)}`): {last}"
    return None


def all_mentions() -> List[Mention]:
    return readme_mentions() + yaml_mentions() + help_mentions() + source_mentions()


# -- the tests --------------------------------------------------------------------------------------


def test_every_printed_command_parses():
    mentions = all_mentions()
    sources = {m.where.split(":")[0].split(" ")[0] for m in mentions}
    assert len(mentions) > 50 and "README.md" in sources and any(s.endswith(".yaml") for s in sources), sources
    failures = [f for f in map(check, mentions) if f]
    assert not failures, "commands that do not exist:\n" + "\n".join(failures)


@pytest.mark.parametrize("text,where,ok", [
    ("harness run ovss --backbone ID --method M[,M...] --dataset D --data-root DIR", "README.md:1", True),
    ("harness run TASK --backbone ID --dataset D --data-root DIR [--split S]", "README.md:1", True),
    ("harness list backbones|methods|datasets", "README.md:1", True),
    ("harness list backbones|methodz", "README.md:1", False),          # one bad alternative
    ("harness data prepare nyu --bts-root/--bts-split", "x.yaml:1", True),
    ("harness data prepare nyu --bts-roots", "x.yaml:1", False),        # no such option
    ("harness data prepare context needs --json x", "e.py:1 (running text)", True),  # prose ends at "needs"
    ("harness data prepair nyu", "x.py:1", False),                      # no such subcommand
    ("harness distill dvt --backbone \x00 ...", "x.py:1", True),        # f-string field, "..."
    ("harness ttr find-neurons --top-k N --out FILE", "x.py:1", True),   # N where an int is wanted
    ("harness run --help", "x.py:1", True),
    ("harness report --results DIR", "README.md:9 (code block)", False),
])
def test_rules_on_hand_written_mentions(text, where, ok):
    m = Mention(text, where, full=where.endswith("(code block)"))
    assert (check(m) is None) == ok, check(m)


def test_failure_message_names_the_source_and_the_command():
    msg = check(Mention("harness data prepare nyu --bts-roots DIR", "harness/protocols/depth/faithful.yaml:26"))
    assert msg is not None and msg.startswith("harness/protocols/depth/faithful.yaml:26: ")
    assert "`harness data prepare nyu --bts-roots DIR`" in msg and "--bts-roots" in msg


def test_collectors_find_known_commands():
    readme = [m.text for m in readme_mentions()]
    assert any(t.startswith("harness ttr find-neurons --backbone clip-b16-openai") for t in readme)
    assert any("--bts-root" in m.text for m in yaml_mentions())
    assert any("harness list" in m.text for m in help_mentions())
    src = source_mentions()
    assert any(m.where.startswith("harness/datasets/nyu.py") and "--mat" in m.text for m in src)
    assert any(FIELD in m.text for m in src)  # f-string literals are read


def test_variants_expand_each_alternative():
    got = variants("harness list a|b --x 1|2")
    assert [" ".join(v) for v in got] == ["harness list a --x 1", "harness list b --x 1", "harness list a --x 2"]
