"""Corpus loading and tokenize-based feature labels, checked against hand-written snippets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import BAD_DATA, bad_data
from l2e_optim._lab.corpus import DataError, batches, load_corpus
from l2e_optim._lab.python_features import FEATURE_NAMES, label_python_bytes


def labels_of(source: str, fragment: str, occurrence: int = 0) -> set[str]:
    """The feature names on the bytes of the ``occurrence``-th ``fragment`` in ``source``."""
    data, piece = source.encode(), fragment.encode()
    start = -1
    for _ in range(occurrence + 1):
        start = data.index(piece, start + 1)
    labels = label_python_bytes(source)[start : start + len(piece)]
    return {FEATURE_NAMES[i] for i in labels.tolist()}


SNIPPET = '''"""Module docstring."""
import os  # a comment
from typing import List

X = 0x1F + 3.5e-2


class Greeter(object):
    """Class docstring."""

    greeting = "hello"

    def greet(self, name: str = 'you') -> str:
        # comment before the docstring
        """Method docstring."""
        if name is None or not name:
            return self.greeting
        return f"{self.greeting}, {name}"


async def fetch():
    "single-quoted docstring"
    match = [1, 2]
    return match


def one_liner(): "one-line docstring"


def not_a_docstring():
    x = 1
    "a string that is not first"
    return "".join(["a", "b"])


def expression_first():
    "joined".join(["c"])
'''


@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        ('"""Module docstring."""', "docstring"),
        ('"""Class docstring."""', "docstring"),
        ('"""Method docstring."""', "docstring"),
        ('"single-quoted docstring"', "docstring"),
        ('"one-line docstring"', "docstring"),
        ('"a string that is not first"', "string"),
        ('"hello"', "string"),
        ("'you'", "string"),
        ('"joined"', "string"),
        ("# a comment", "comment"),
        ("# comment before the docstring", "comment"),
        ("0x1F", "number"),
        ("3.5e-2", "number"),
        ("import", "keyword"),
        ("class", "keyword"),
        ("async", "keyword"),
        ("None", "keyword"),
        ("return", "keyword"),
        ("Greeter", "identifier"),
        ("self", "identifier"),
        ("match", "identifier"),  # a soft keyword: an identifier here
        ("->", "operator"),
        ("+", "operator"),
        ("(", "operator"),
    ],
)
def test_token_labels(fragment: str, expected: str) -> None:
    assert labels_of(SNIPPET, fragment) == {expected}


def test_whitespace_and_length() -> None:
    labels = label_python_bytes(SNIPPET)
    assert labels.dtype == torch.int64 and labels.numel() == len(SNIPPET.encode())
    assert labels_of(SNIPPET, "\n\n\nclass") == {"whitespace", "keyword"}
    assert labels_of(SNIPPET, "    greeting = ") == {"whitespace", "identifier", "operator"}


def test_multibyte_characters_map_to_bytes() -> None:
    source = 's = "héllo ✓"  # ünïcode\nn = 1\n'
    labels = label_python_bytes(source)
    assert labels.numel() == len(source.encode())
    assert labels_of(source, '"héllo ✓"') == {"string"}
    assert labels_of(source, "# ünïcode") == {"comment"}
    assert labels_of(source, "n =") == {"identifier", "whitespace", "operator"}  # after multi-byte
    assert labels_of(source, "1") == {"number"}


def test_multiline_string_spans_lines() -> None:
    source = 'def f():\n    x = 1\n    y = """a\nb\n"""\n'
    assert labels_of(source, '"""a\nb\n"""') == {"string"}


def test_source_that_does_not_tokenize_is_all_other() -> None:
    source = "x = (1,\n"  # EOF inside a bracket
    labels = label_python_bytes(source)
    assert labels.numel() == len(source.encode())
    assert set(labels.tolist()) == {FEATURE_NAMES.index("whitespace")}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_python_folder_labels_align_and_split_by_file(tmp_path: Path) -> None:
    sources = [f'"""Doc {i}."""\nvalue_{i} = {i} * 2  # note\n' * 3 for i in range(12)]
    for i, text in enumerate(sources):
        write(tmp_path / "pkg" / f"m{i:02d}.py", text)
    write(tmp_path / "pkg" / "__pycache__" / "junk.py", "ignored = 1\n")
    corpus = load_corpus([tmp_path], val_fraction=0.25)
    assert len(corpus.sources) == 12 and all("__pycache__" not in s for s in corpus.sources)
    assert corpus.train_features is not None and corpus.val_features is not None
    assert corpus.train.shape == corpus.train_features.shape
    assert corpus.val.shape == corpus.val_features.shape
    assert corpus.train.numel() + corpus.val.numel() == sum(len(s.encode()) for s in sources)
    # Whole files: the validation bytes are a concatenation of complete files with their labels.
    val_text = bytes(corpus.val.tolist()).decode()
    val_files = [s for s in sources if s in val_text]
    assert val_files and "".join(val_files) == val_text
    expected = torch.cat([label_python_bytes(s) for s in val_files])
    assert torch.equal(corpus.val_features, expected)
    again = load_corpus([tmp_path], val_fraction=0.25)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)


def test_text_files_have_no_features_and_single_file_splits_at_tail(tmp_path: Path) -> None:
    text = "plain prose, not python at all. " * 50
    corpus = load_corpus([write(tmp_path / "notes.txt", text)], val_fraction=0.2)
    assert corpus.train_features is None and corpus.val_features is None
    joined = bytes(corpus.train.tolist()) + bytes(corpus.val.tolist())
    assert joined == text.encode()
    assert abs(corpus.val.numel() - 0.2 * len(text)) <= 1


def test_max_bytes_caps_the_corpus(tmp_path: Path) -> None:
    for i in range(5):
        write(tmp_path / f"f{i}.txt", "abcdefghij" * 100)
    corpus = load_corpus([tmp_path], max_bytes=2500)
    assert corpus.train.numel() + corpus.val.numel() == 2500


def test_default_corpus_is_labelled_stdlib() -> None:
    corpus = load_corpus(max_bytes=60_000)
    assert corpus.train_features is not None and corpus.val_features is not None
    assert corpus.train.numel() + corpus.val.numel() == 60_000
    assert corpus.val.numel() > 0 and all(s.endswith(".py") for s in corpus.sources)
    present = {FEATURE_NAMES[i] for i in corpus.train_features.unique().tolist()}
    assert {"comment", "docstring", "keyword", "identifier", "operator"} <= present
    assert int(corpus.train.max()) < 256


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_raises_data_error_naming_the_path(tmp_path: Path, case: str) -> None:
    with pytest.raises(DataError, match=case):
        load_corpus([bad_data(tmp_path, case)])


def test_batches_are_deterministic_windows() -> None:
    tokens = torch.arange(1000) % 256
    first = batches(tokens, batch_size=4, seq_len=16, seed=3)
    second = batches(tokens, batch_size=4, seq_len=16, seed=3)
    for _ in range(3):
        a, b = next(first), next(second)
        assert a.shape == (4, 17) and torch.equal(a, b)
        assert bool(((a[:, 1:] - a[:, :-1]) % 256 == 1).all())  # contiguous slices
    other = next(batches(tokens, batch_size=4, seq_len=16, seed=4))
    assert not torch.equal(other, next(batches(tokens, batch_size=4, seq_len=16, seed=3)))
    with pytest.raises(DataError, match="fewer than one window"):
        next(batches(tokens[:10], batch_size=2, seq_len=16, seed=0))
