"""The English corpus: the per-byte feature rule, prose extraction, the mixed corpus."""

from __future__ import annotations

import pytest
import torch

from l2e_optim._lab.corpus import DataError
from l2e_optim._lab.python_features import FEATURE_NAMES
from l2e_optim._lab.prose import (
    ENGLISH_FEATURES,
    MIXED_FEATURES,
    label_english_bytes,
    load_english,
    load_mixed,
    load_named,
    python_prose,
)


def names_of(text: str, fragment: str) -> list[str]:
    data = text.encode()
    start = data.index(fragment.encode())
    labels = label_english_bytes(data)[start : start + len(fragment.encode())]
    return [ENGLISH_FEATURES[i] for i in labels.tolist()]


TEXT = "The Parser reads 12 lines of it, then stops.\nSee é!"


def test_rule_labels_each_class() -> None:
    assert names_of(TEXT, "The") == ["function_word"] * 3  # function words win over capitals
    assert names_of(TEXT, "of") == ["function_word"] * 2
    assert names_of(TEXT, "it") == ["function_word"] * 2
    assert names_of(TEXT, "Parser") == ["capital"] + ["word_internal"] * 5
    assert names_of(TEXT, "reads") == ["word_initial"] + ["word_internal"] * 4
    assert names_of(TEXT, "12") == ["digit"] * 2
    assert names_of(TEXT, " 12 ") == ["space", "digit", "digit", "space"]
    assert names_of(TEXT, ", ") == ["punctuation", "space"]
    assert names_of(TEXT, ".\nSee") == ["punctuation", "newline", "capital", "word_internal", "word_internal"]
    assert names_of(TEXT, "é") == ["other", "other"]  # two UTF-8 bytes, not ASCII letters


def test_rule_matches_whole_words_only_and_mixed_case() -> None:
    # "theory" is not a function word, though "the" is a prefix of it.
    assert names_of("the theory", "theory") == ["word_initial"] + ["word_internal"] * 5
    assert names_of(TEXT, "then") == ["function_word"] * 4
    assert names_of("fooBar THE", "fooBar") == ["word_initial", "word_internal", "word_internal",
                                                 "capital", "word_internal", "word_internal"]
    assert names_of("fooBar THE", "THE") == ["function_word"] * 3
    labels = label_english_bytes(TEXT.encode())
    assert labels.dtype == torch.int64 and labels.numel() == len(TEXT.encode())
    assert label_english_bytes(b"").numel() == 0


SOURCE = '''#!/usr/bin/env python
"""Module summary line.

More words here.

>>> print(1 + 1)
2

After the example.
"""
import os  # type: ignore


def f(x):
    """Return x."""
    # This comment explains why we add one,
    # and it goes on for a second line.
    return x + 1  # ok
'''


def test_python_prose_keeps_docstrings_and_comments() -> None:
    prose = python_prose(SOURCE)
    assert "Module summary line.\n\nMore words here." in prose
    assert "After the example." in prose and ">>>" not in prose and "\n2\n" not in prose  # doctest dropped
    assert "Return x." in prose
    assert "This comment explains why we add one, and it goes on for a second line." in prose
    assert "usr/bin" not in prose and "type: ignore" not in prose and "ok" not in prose.split()
    assert "import" not in prose and "return x" not in prose
    assert python_prose("x = (1,\n") == ""  # does not tokenize


def test_english_corpus_is_labelled_prose() -> None:
    corpus = load_english(max_bytes=60_000)
    assert corpus.feature_names == ENGLISH_FEATURES and len(ENGLISH_FEATURES) >= 8
    assert corpus.train_features is not None and corpus.val_features is not None
    assert corpus.train.shape == corpus.train_features.shape and corpus.val.shape == corpus.val_features.shape
    assert corpus.train.numel() + corpus.val.numel() == 60_000
    assert torch.equal(corpus.train_features, label_english_bytes(bytes(corpus.train.tolist())))
    present = {ENGLISH_FEATURES[i] for i in corpus.train_features.unique().tolist()}
    assert present >= set(ENGLISH_FEATURES) - {"other"}
    assert any(s.startswith("pydoc_data.topics:") for s in corpus.sources)
    assert any(s.endswith(":prose") for s in corpus.sources)
    text = bytes(corpus.train.tolist()).decode(errors="replace")
    assert text.count(" the ") > 20 and "def " not in text[:2000]


def test_mixed_corpus_holds_both_kinds_on_both_sides() -> None:
    corpus = load_mixed(max_bytes=300_000)
    assert corpus.feature_names == MIXED_FEATURES
    assert corpus.train_features is not None and corpus.val_features is not None
    for features in (corpus.train_features, corpus.val_features):
        share = float(features.float().mean())  # code is 1
        assert 0.2 < share < 0.8, share
    code = corpus.train[corpus.train_features == MIXED_FEATURES.index("code")]
    assert b"def " in bytes(code.tolist())


def test_named_corpora() -> None:
    assert load_named("code", max_bytes=20_000).feature_names == FEATURE_NAMES
    assert load_named("english", max_bytes=20_000).feature_names == ENGLISH_FEATURES
    with pytest.raises(DataError, match="unknown corpus 'french'.*code, english, mixed"):
        load_named("french")
