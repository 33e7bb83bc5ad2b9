"""Offline English text for calibration and held-out evaluation.

Source: the Wikipedia dump excerpt that the PyPI package ``gensim`` (LGPL-2.1)
ships as test data,
``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(about 6 MB of wikitext, 2016 revisions of the first English Wikipedia
articles: Anarchism, Autism, Albedo, Alabama, Abraham Lincoln, Aristotle, ...).
The article text is Wikipedia's, licensed CC BY-SA 3.0 (and GFDL); the
derived plain text keeps that license. Nothing is downloaded at run time: the
file is found through the installed distribution's file list
(``importlib.metadata``), so gensim itself is never imported.

The wikitext is turned into plain prose by :func:`wikitext_to_plain` (our own
small cleaner: templates, tables, references, files and categories removed,
links replaced by their shown text, sections such as "References" dropped).

Two disjoint splits, by article (a stable hash of the title decides):

- ``calibration``: about 80 % of the articles, for ``compress --calib-text``;
- ``heldout``: the other articles, for ``eval``. Never calibrate on it.

``python -m vllm_neuronmlp.tools.data.text_data DIR`` writes ``DIR/calibration.txt``
and ``DIR/heldout.txt``. In the CLI the names ``builtin:calibration`` and
``builtin:heldout`` stand for these splits wherever a text file is expected.
"""
from __future__ import annotations

import bz2
import hashlib
import html
import os
import re
import sys
import xml.etree.ElementTree as ET
from functools import lru_cache
from typing import Iterator, List, Tuple

DIST_NAME = "gensim"
DUMP_SUFFIX = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SOURCE_DESCRIPTION = (
    "English Wikipedia (CC BY-SA 3.0), 2016 dump excerpt shipped as test data in the PyPI package "
    "gensim (" + DUMP_SUFFIX + ")")
BUILTIN_PREFIX = "builtin:"
SPLITS = ("calibration", "heldout")
HELDOUT_MODULUS = 5  # one article in five (by title hash) is held out

# Sections after which an article holds lists of sources, not prose.
_STOP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited", "literature",
    "selected bibliography", "works", "publications", "discography", "filmography",
}
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "template:",
                       "help:", "portal:", "special:", "user:", "talk:", "wikt:")


class TextDataError(RuntimeError):
    """The built-in text cannot be found or read."""


def dump_path() -> str:
    """Path of the Wikipedia dump excerpt inside the installed gensim package."""
    from importlib import metadata

    from vllm_neuronmlp.tools.data.installed_files import find_in_distribution

    try:
        path, version = find_in_distribution(DIST_NAME, DUMP_SUFFIX)
    except metadata.PackageNotFoundError:
        raise TextDataError(
            f"the built-in text needs the PyPI package '{DIST_NAME}' (it ships the Wikipedia excerpt "
            f"{DUMP_SUFFIX}); install it with `pip install {DIST_NAME}` or pass your own text file") from None
    if path is None:
        raise TextDataError(f"the installed {DIST_NAME} {version} has no file {DUMP_SUFFIX}")
    return path


# ------------------------------------------------------------------ wikitext cleaning
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF_PAIR = re.compile(r"<ref\b[^>/]*(?:/[^>][^>]*)?>.*?</ref\s*>", re.S | re.I)
_REF_SELF = re.compile(r"<ref\b[^>]*/>", re.I)
_DROP_TAGS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|pre|imagemap|chem|ce|graph|mapframe|table)\b"
    r"[^>]*>.*?</\1\s*>", re.S | re.I)
_ANY_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*(?:\s([^\]]*))?\]")
_BARE_URL = re.compile(r"https?://\S+")
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")
_BOLD_ITALIC = re.compile(r"'{2,5}")
_MAGIC = re.compile(r"__[A-Z]+__")
_SPACES = re.compile(r"[ \t\u00a0]+")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_SPACE_PUNCT = re.compile(r"\s+([,.;:!?])")


def _remove_nested(pattern: re.Pattern, text: str, repl: str = "") -> str:
    """Remove innermost matches until none is left (templates and tables nest)."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return new
        text = new


def _link_text(match: re.Match) -> str:
    inner = match.group(1)
    target, _, shown = inner.partition("|")
    t = target.strip().lower()
    if t.startswith(_DROP_LINK_PREFIXES) or re.match(r"^:?[a-z]{2,3}(-[a-z]+)?:", t):
        return ""
    if shown:
        return shown.rpartition("|")[2] if "|" in shown else shown
    return target.lstrip(":").split("#")[0] if not target.startswith("#") else target[1:]


def wikitext_to_plain(text: str) -> str:
    """Plain prose from one article's wikitext: paragraphs separated by blank
    lines, headings kept as their own short paragraphs, reference sections dropped."""
    text = html.unescape(text) if "&lt;" in text or "&amp;" in text else text
    text = _COMMENT.sub("", text)
    text = _REF_PAIR.sub("", text)
    text = _REF_SELF.sub("", text)
    text = _DROP_TAGS.sub("", text)
    text = _remove_nested(_TEMPLATE, text)
    text = _remove_nested(_TABLE, text)
    text = _links(text)
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _ANY_TAG.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text)
    text = _BOLD_ITALIC.sub("", text)

    paragraphs: List[str] = []
    current: List[str] = []

    def flush() -> None:
        if current:
            para = _SPACES.sub(" ", " ".join(current)).strip()
            para = _EMPTY_PARENS.sub("", para)
            para = _SPACE_PUNCT.sub(r"\1", para)
            para = _SPACES.sub(" ", para).strip()
            if len(para) >= 3:
                paragraphs.append(para)
            current.clear()

    for raw in text.split("\n"):
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            flush()
            title = heading.group(2).strip()
            if title.lower() in _STOP_SECTIONS:
                break
            if title:
                paragraphs.append(title)
            continue
        if not line:
            flush()
            continue
        if line[0] in "|!{}" or line.startswith("----"):
            flush()
            continue
        if line[0] in "*#:;":
            flush()
            item = line.lstrip("*#:; ").strip()
            if len(item.split()) >= 4:  # keep list items that are sentences
                paragraphs.append(_SPACES.sub(" ", item))
            continue
        current.append(line)
    flush()
    # drop paragraphs with no sentence in them (headings, stray captions) and
    # the rare paragraph where unbalanced markup survived the cleaning
    return "\n\n".join(p for p in paragraphs
                        if len(p.split()) >= 2 and not any(m in p for m in ("{{", "}}", "[[", "]]", "{|", "|}")))


def _links(text: str) -> str:
    while True:
        new = _LINK.sub(_link_text, text)
        if new == text:
            return new
        text = new


# ------------------------------------------------------------------ articles and splits
def _pages(path: str) -> Iterator[Tuple[str, str]]:
    """(title, wikitext) of the main-namespace, non-redirect pages of a dump."""
    with bz2.open(path, "rb") as f:
        title, ns, redirect, body = None, None, False, None
        for _event, elem in ET.iterparse(f, events=("end",)):
            tag = elem.tag.rpartition("}")[2]
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                ns = elem.text
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                body = elem.text or ""
            elif tag == "page":
                if ns == "0" and not redirect and body and not body.lstrip().upper().startswith("#REDIRECT"):
                    yield title, body
                title, ns, redirect, body = None, None, False, None
                elem.clear()


def split_of(title: str) -> str:
    h = int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:8], 16)
    return "heldout" if h % HELDOUT_MODULUS == 0 else "calibration"


@lru_cache(maxsize=1)
def articles() -> Tuple[Tuple[str, str, str], ...]:
    """(title, split, plain text) of every usable article, in dump order."""
    out = []
    for title, body in _pages(dump_path()):
        plain = wikitext_to_plain(body)
        if len(plain.split()) < 200:  # stubs and disambiguation pages
            continue
        out.append((title, split_of(title), plain))
    return tuple(out)


def split_text(split: str) -> str:
    """The text of one split: its articles joined with blank lines."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return "\n\n".join(text for _t, s, text in articles() if s == split)


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def read_text(name: str) -> str:
    """Text of a file, or of a built-in split given as `builtin:calibration` /
    `builtin:heldout`. Errors name the file."""
    if is_builtin(name):
        split = name[len(BUILTIN_PREFIX):]
        if split not in SPLITS:
            raise TextDataError(f"{name}: unknown built-in text; use one of "
                                f"{', '.join(BUILTIN_PREFIX + s for s in SPLITS)}")
        return split_text(split)
    if not os.path.isfile(name):
        raise TextDataError(f"{name}: text file not found")
    try:
        with open(name, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise TextDataError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise TextDataError(f"{name}: cannot read ({e.strerror})") from None


def describe(name: str) -> str:
    if is_builtin(name):
        return f"{name} ({SOURCE_DESCRIPTION})"
    return os.path.abspath(name)


def write_splits(directory: str) -> List[str]:
    os.makedirs(directory, exist_ok=True)
    paths = []
    for split in SPLITS:
        path = os.path.join(directory, f"{split}.txt")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(split_text(split))
        os.replace(tmp, path)
        paths.append(path)
    return paths


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m vllm_neuronmlp.tools.data.text_data DIR\n\n"
              "Writes DIR/calibration.txt and DIR/heldout.txt, two disjoint splits (by article) of "
              + SOURCE_DESCRIPTION + ".")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    for path in write_splits(argv[0]):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        print(f"{path}: {len(text.split())} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
