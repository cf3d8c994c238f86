"""Per-byte feature labels of Python source, from Python's own ``tokenize`` module.

Every UTF-8 byte gets one label (comment, docstring, string, number, keyword, identifier,
operator, whitespace/other): the labelled feature set that the False Killing Rate and the
feature-specific monosemanticity of the analysis need.
"""

from __future__ import annotations

import io
import keyword
import token
import tokenize

import torch
from torch import Tensor

FEATURE_NAMES: tuple[str, ...] = (
    "comment",
    "docstring",
    "string",
    "number",
    "keyword",
    "identifier",
    "operator",
    "whitespace",
)
"""Feature label names; a label is the index into this tuple (whitespace/other last)."""

COMMENT, DOCSTRING, STRING, NUMBER, KEYWORD, IDENTIFIER, OPERATOR, OTHER = range(len(FEATURE_NAMES))

# Token kinds that carry no feature; their bytes stay OTHER. (Names, since 3.12 adds FSTRING_*.)
_STRING_KINDS = frozenset({"STRING", "FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"})
_SKIP_BEFORE_DOC = frozenset({tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.ENCODING})


def label_python_bytes(source: str) -> Tensor:
    """Feature label of every UTF-8 byte of ``source``, from Python's ``tokenize``.

    A docstring is a STRING token that is the whole first statement of a module, class or
    function body; keywords are ``keyword.iskeyword`` names (soft keywords such as ``match``
    count as identifiers). Bytes of no token (spaces, newlines, indentation) are "whitespace".
    Source that does not tokenize gets "whitespace"/other for every byte.

    Returns:
        ``[len(source.encode())]`` int64 labels, indices into :data:`FEATURE_NAMES`.
    """
    data = source.encode("utf-8")
    labels = bytearray([OTHER]) * len(data)
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return _as_tensor(labels)
    offsets = _LineOffsets(source)
    docstrings = docstring_indices(tokens)
    for index, tok in enumerate(tokens):
        label = _token_label(tok, index in docstrings)
        if label is None:
            continue
        start, end = offsets.byte(tok.start), offsets.byte(tok.end)
        labels[start:end] = bytes([label]) * (end - start)
    return _as_tensor(labels)


def _as_tensor(labels: bytearray) -> Tensor:
    return torch.frombuffer(labels, dtype=torch.uint8).to(torch.int64) if labels else torch.zeros(0, dtype=torch.int64)


def _token_label(tok: tokenize.TokenInfo, is_docstring: bool) -> int | None:
    name = token.tok_name[tok.type]
    if tok.type == tokenize.COMMENT:
        return COMMENT
    if name in _STRING_KINDS:
        return DOCSTRING if is_docstring else STRING
    if tok.type == tokenize.NUMBER:
        return NUMBER
    if tok.type == tokenize.NAME:
        return KEYWORD if keyword.iskeyword(tok.string) else IDENTIFIER
    if tok.type == tokenize.OP:
        return OPERATOR
    return None


class _LineOffsets:
    """Maps tokenize's (row, character column) positions to UTF-8 byte offsets."""

    def __init__(self, source: str) -> None:
        self.lines = io.StringIO(source).readlines()  # the same line splitting tokenize sees
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line.encode("utf-8")))

    def byte(self, position: tuple[int, int]) -> int:
        row, col = position
        if row - 1 >= len(self.lines):  # ENDMARKER and DEDENTs sit past the last line
            return self.starts[-1]
        line = self.lines[row - 1]
        prefix = col if line.isascii() else len(line[:col].encode("utf-8"))
        return self.starts[row - 1] + prefix


def docstring_indices(tokens: list[tokenize.TokenInfo]) -> set[int]:
    """Indices of the STRING tokens that form docstrings (module, class and def bodies)."""
    found: set[int] = set()
    expect_body = True  # the module body starts at the first token
    in_header = False  # between `def`/`class` and the header's closing colon
    depth = 0
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if expect_body and tok.type not in _SKIP_BEFORE_DOC:
            expect_body = False
            j = i
            while j < len(tokens) and tokens[j].type in (tokenize.STRING, tokenize.NL, tokenize.COMMENT):
                j += 1  # implicit concatenation: "a" "b" is one docstring
            strings = [k for k in range(i, j) if tokens[k].type == tokenize.STRING]
            ends_statement = j < len(tokens) and (
                tokens[j].type in (tokenize.NEWLINE, tokenize.ENDMARKER, tokenize.DEDENT)
                or tokens[j].string == ";"
            )
            if strings and ends_statement:
                found.update(strings)
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth = max(0, depth - 1)
        elif tok.type == tokenize.NAME and tok.string in ("def", "class"):
            in_header = True
        elif in_header and depth == 0 and tok.type == tokenize.OP and tok.string == ":":
            in_header = False
            expect_body = True
        i += 1
    return found


def python_labels(name: str, data: bytes) -> Tensor:
    """:func:`label_python_bytes` of UTF-8 bytes that may end mid-character (``[len(data)]``)."""
    # A file cut at max_bytes may end mid-character; drop the partial character's bytes.
    labels = label_python_bytes(data.decode("utf-8", errors="ignore"))
    if labels.numel() < len(data):
        labels = torch.cat([labels, torch.full((len(data) - labels.numel(),), OTHER, dtype=torch.int64)])
    return labels
