"""English prose from the standard library, byte-labelled; and a prose + code mixed corpus.

Every Python install ships two bodies of English: the docstrings and comments of its standard
library (found here with ``tokenize``, the same pass that labels the code corpus) and
``pydoc_data.topics`` (the language reference's help topics, about 465 kB). No download.

Feature rule for English bytes (:data:`ENGLISH_FEATURES`), from the text alone. A *word* is a
maximal run of ASCII letters. In order of precedence:

1. ``function_word``: every byte of a word whose lower case is in :data:`FUNCTION_WORDS`
   (a small closed list of articles, prepositions, conjunctions, pronouns and auxiliaries);
2. ``capital``: an upper-case letter of any other word;
3. ``word_initial``: the first (lower-case) letter of any other word;
4. ``word_internal``: the remaining letters;
5. ``digit`` (0-9), ``space`` (space, tab), ``newline`` (LF, CR), ``punctuation``
   (ASCII ``string.punctuation``), and ``other`` for every remaining byte (non-ASCII, control).

The mixed corpus holds English documents and Python files, half the bytes each; its two
features are the paper's natural-language vs code-language split: ``prose`` and ``code``, by the
source of the byte (comments inside a Python file count as code).
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import string
import tokenize
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from .corpus import Corpus, DataError, load_corpus, split_documents, stdlib_files, take_documents
from .python_features import docstring_indices

ENGLISH_FEATURES: tuple[str, ...] = (
    "function_word", "capital", "word_initial", "word_internal",
    "digit", "space", "newline", "punctuation", "other",
)
"""Feature names of English bytes; a label is the index into this tuple."""
FUNCTION, CAPITAL, INITIAL, INTERNAL, DIGIT, SPACE, NEWLINE, PUNCT, OTHER = range(len(ENGLISH_FEATURES))

FUNCTION_WORDS: frozenset[str] = frozenset(
    "a an the and or but nor if then than of in on at to for from by with as into about "
    "is are was were be been being it its this that these those which who not no".split()
)
"""The closed list of function words (matched case-insensitively, whole words only)."""

MIXED_FEATURES: tuple[str, ...] = ("prose", "code")
"""Feature names of the mixed corpus: natural language vs code, by source."""

DATA_NAMES: tuple[str, ...] = ("code", "english", "mixed")
"""The built-in corpora: ``code`` (stdlib Python), ``english`` (its prose), ``mixed`` (both)."""

_CLASS_OF_BYTE = bytearray([OTHER]) * 256
for _c in string.digits:
    _CLASS_OF_BYTE[ord(_c)] = DIGIT
for _c in string.punctuation:
    _CLASS_OF_BYTE[ord(_c)] = PUNCT
for _c in " \t":
    _CLASS_OF_BYTE[ord(_c)] = SPACE
for _c in "\n\r":
    _CLASS_OF_BYTE[ord(_c)] = NEWLINE
_WORD = re.compile(rb"[A-Za-z]+")
_UPPER = bytes(range(ord("A"), ord("Z") + 1))
# Comments that are tooling, not prose (shebangs, encodings, linters' and type checkers' marks).
_TOOL_COMMENT = re.compile(r"^(!|-\*-|\s*(type:|noqa|pragma|fmt:|pylint:|XXX\s*$))")
_MIN_COMMENT_WORDS = 3


def label_english_bytes(data: bytes) -> Tensor:
    """Feature label of every byte of English text, by the module's rule (``[len(data)]`` int64)."""
    labels = bytearray(data.translate(_CLASS_OF_BYTE))
    for match in _WORD.finditer(data):
        start, end = match.span()
        word = match.group()
        if word.lower().decode() in FUNCTION_WORDS:
            labels[start:end] = bytes([FUNCTION]) * (end - start)
            continue
        labels[start] = INITIAL
        labels[start + 1 : end] = bytes([INTERNAL]) * (end - start - 1)
        for i, byte in enumerate(word):
            if byte in _UPPER:
                labels[start + i] = CAPITAL
    return torch.frombuffer(labels, dtype=torch.uint8).to(torch.int64) if labels else torch.zeros(0, dtype=torch.int64)


def python_prose(source: str) -> str:
    """The docstrings and comments of one Python source, as paragraphs separated by blank lines.

    Docstrings are cleaned with ``inspect.cleandoc`` and lose their doctest blocks (from a
    ``>>>`` line to the next blank line); runs of comment lines form one paragraph, and comments
    with fewer than 3 words or tooling marks (``# type:``, ``# noqa``, shebangs) are dropped.
    Source that does not tokenize gives ``""``.
    """
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return ""
    paragraphs: list[str] = []
    comment: list[str] = []
    last_comment_row = -2
    for index in sorted(docstring_indices(tokens) | {i for i, t in enumerate(tokens) if t.type == tokenize.COMMENT}):
        tok = tokens[index]
        if tok.type != tokenize.COMMENT:
            paragraphs.append(_docstring_text(tok.string))
            continue
        text = tok.string.lstrip("#").strip()
        if _TOOL_COMMENT.match(text) or len(text.split()) < _MIN_COMMENT_WORDS:
            continue
        if tok.start[0] != last_comment_row + 1 and comment:
            paragraphs.append(" ".join(comment))
            comment = []
        comment.append(text)
        last_comment_row = tok.start[0]
    if comment:
        paragraphs.append(" ".join(comment))
    return "\n\n".join(p for p in paragraphs if p.strip())


def _docstring_text(literal: str) -> str:
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError):
        return ""
    if not isinstance(value, str):
        return ""
    kept: list[str] = []
    in_doctest = False
    for line in inspect.cleandoc(value).splitlines():
        in_doctest = line.lstrip().startswith(">>>") or (in_doctest and bool(line.strip()))
        if not in_doctest:
            kept.append(line)
    return "\n".join(kept).strip()


def english_documents() -> Iterator[tuple[str, bytes]]:
    """English documents, named, in a fixed order: pydoc topics and stdlib files' prose, alternating.

    The pydoc topics (sorted by key) alternate with the files' prose (in the code corpus's seeded
    file order) while both last, so a small byte budget, and the validation split (whole
    documents), hold both kinds of English.
    """
    from pydoc_data.topics import topics

    pydoc = ((f"pydoc_data.topics:{key}", topics[key].strip().encode("utf-8")) for key in sorted(topics))
    files = ((f"{path}:prose", python_prose(_read_text(path)).encode("utf-8")) for path in stdlib_files())
    yield from _alternate(pydoc, files)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""  # an unreadable file has no prose to offer


def _alternate(*streams: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
    """One item of each stream in turn; exhausted streams drop out."""
    live = list(streams)
    while live:
        for stream in list(live):
            item = next(stream, None)
            if item is None:
                live.remove(stream)
            else:
                yield item


def load_english(*, max_bytes: int = 2_000_000, val_fraction: float = 0.1) -> Corpus:
    """The English corpus (docstrings, comments, pydoc topics), labelled with :data:`ENGLISH_FEATURES`."""
    texts = take_documents(english_documents(), max_bytes)
    return split_documents(texts, _english_labels, val_fraction, ENGLISH_FEATURES)


def _english_labels(name: str, data: bytes) -> Tensor:
    return label_english_bytes(data)  # the rule needs the bytes only, not the document's name


def load_mixed(*, max_bytes: int = 2_000_000, val_fraction: float = 0.1) -> Corpus:
    """Half English (:func:`load_english`), half Python (the code corpus), features ``prose`` / ``code``.

    Each half is split on its own, so train and validation both hold the two kinds in the same
    proportion; the halves are concatenated (prose first). Every byte of a Python file is
    ``code`` (its comments and docstrings too), every byte of an English document ``prose``.
    """
    parts = (load_english(max_bytes=max_bytes // 2, val_fraction=val_fraction),
             load_corpus(max_bytes=max_bytes - max_bytes // 2, val_fraction=val_fraction))

    def kinds(side: str) -> Tensor:
        return torch.cat([torch.full((getattr(c, side).numel(),), k, dtype=torch.int64) for k, c in enumerate(parts)])

    return Corpus(
        train=torch.cat([c.train for c in parts]), val=torch.cat([c.val for c in parts]),
        train_features=kinds("train"), val_features=kinds("val"),
        sources=parts[0].sources + parts[1].sources, feature_names=MIXED_FEATURES,
    )


def load_named(name: str, *, max_bytes: int = 2_000_000, val_fraction: float = 0.1) -> Corpus:
    """One of :data:`DATA_NAMES`: ``code``, ``english`` or ``mixed``.

    Raises:
        DataError: an unknown name (the message lists the known ones).
    """
    if name == "code":
        return load_corpus(max_bytes=max_bytes, val_fraction=val_fraction)
    if name == "english":
        return load_english(max_bytes=max_bytes, val_fraction=val_fraction)
    if name == "mixed":
        return load_mixed(max_bytes=max_bytes, val_fraction=val_fraction)
    raise DataError(f"unknown corpus {name!r}; use one of {', '.join(DATA_NAMES)}.")
