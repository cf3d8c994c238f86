"""Byte-level training data with per-byte feature labels, built from local text only.

The default corpus is the running interpreter's standard-library Python sources: present wherever
Python is, no download. Tokens are raw UTF-8 bytes (vocabulary 256). For Python text every byte
also gets a feature label (``python_features``: comment, docstring, string, number, keyword,
identifier, operator, whitespace/other), the labelled feature set the False Killing Rate needs.
"""

from __future__ import annotations

import dataclasses
import functools
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .python_features import FEATURE_NAMES, python_labels

# Generated tables and deliberately broken test inputs are not representative Python text.
_STDLIB_SKIP = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "pydoc_data"}
)
_PYTHON_SUFFIXES = (".py", ".pyi")


class DataError(ValueError):
    """Training data is missing, empty or not text; the message names the path and the fix."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Byte tokens split into train and validation, with optional per-byte feature labels.

    Attributes:
        train: ``[bytes]`` int64 training tokens (values 0..255).
        val: ``[bytes]`` int64 validation tokens.
        train_features: ``[bytes]`` int64 label per training byte (index into
            :data:`FEATURE_NAMES`), or ``None`` when the text is not Python.
        val_features: the same for ``val``.
        sources: the files (or documents) used, in corpus order.
        feature_names: what each label index means (:data:`FEATURE_NAMES` for Python text).
    """

    train: Tensor
    val: Tensor
    train_features: Tensor | None
    val_features: Tensor | None
    sources: tuple[str, ...]
    feature_names: tuple[str, ...] = FEATURE_NAMES

#: ``labeller(name, data)``: per-byte labels of one named document (``[len(data)]`` int64).
Labeller = Callable[[str, bytes], Tensor]


def load_corpus(
    paths: Sequence[str | Path] | None = None,
    *,
    max_bytes: int = 2_000_000,
    val_fraction: float = 0.1,
) -> Corpus:
    """Load byte tokens (and Python feature labels) from local files.

    Args:
        paths: ``None`` for the interpreter's standard-library ``.py`` sources (a fixed,
            seeded order of the sorted file list, so the same Python gives the same corpus);
            else the user's text files or folders (searched recursively; hidden entries and
            ``__pycache__`` skipped; binary files inside folders skipped).
        max_bytes: stop adding files once this many bytes are loaded (the last file is cut).
        val_fraction: share of bytes for validation. Whole files go to one side, chosen
            deterministically along the file order; a single file is split at its tail instead.

    Feature labels exist when every file is Python (``.py``/``.pyi``); else they are ``None``.

    Raises:
        DataError: a path is missing, a file or folder is empty, or an explicit file is not
            UTF-8 text; the message names the path and the fix.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction!r} must lie in (0, 1), e.g. 0.1.")
    if max_bytes < 2:
        raise DataError(f"max_bytes={max_bytes!r} must be at least 2.")
    files = stdlib_files() if paths is None else _user_files(paths)
    texts = take_documents(((str(path), path.read_bytes()) for path in files), max_bytes)
    if not texts:
        where = "the standard library" if paths is None else ", ".join(str(p) for p in paths)
        raise DataError(f"no text found in {where}; pass files or folders holding UTF-8 text.")
    python = all(name.endswith(_PYTHON_SUFFIXES) for name, _ in texts)
    return split_documents(texts, python_labels if python else None, val_fraction)


def take_documents(docs: Iterable[tuple[str, bytes]], max_bytes: int) -> list[tuple[str, bytes]]:
    """Named documents in order until ``max_bytes`` (the last one cut; blank ones skipped)."""
    texts: list[tuple[str, bytes]] = []
    total = 0
    for name, data in docs:
        if data.strip():
            texts.append((name, data[: max_bytes - total]))
            total += len(texts[-1][1])
        if total >= max_bytes:  # before the next read: the iterator may read files lazily
            break
    return texts


def stdlib_files() -> list[Path]:
    """The standard library's Python files in the corpus order (a fixed seeded shuffle)."""
    return list(_stdlib_files())


@functools.cache  # walking the library takes seconds; the corpora ask for it more than once
def _stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in sorted(root.rglob("*.py"))
        if not (_STDLIB_SKIP & set(p.relative_to(root).parts))
        and not p.name.startswith("_sysconfigdata")
    ]
    # A seeded shuffle spreads a small byte budget over the whole library, not just "a*".
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()  # sync-ok: CPU file order
    return tuple(files[i] for i in order)


def _user_files(paths: Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("no data path given; pass at least one text file or folder.")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(f"data path {str(raw)!r} does not exist; pass an existing text file or folder.")
        if path.is_dir():
            found = [f for f in sorted(path.rglob("*")) if _visible(f, path) and f.is_file() and _is_text(f)]
            if not found:
                raise DataError(
                    f"data folder {str(raw)!r} holds no non-empty UTF-8 text files; "
                    "point --data at a folder of .txt/.py/.md files."
                )
            files.extend(found)
        else:
            if path.stat().st_size == 0:
                raise DataError(f"data file {str(raw)!r} is empty; pass a file with text in it.")
            if not _is_text(path):
                raise DataError(
                    f"data file {str(raw)!r} is not UTF-8 text (binary or another encoding); "
                    "pass plain-text files, or convert it to UTF-8 first."
                )
            files.append(path)
    return files


def _visible(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return not any(part.startswith(".") or part == "__pycache__" for part in parts)


def _is_text(path: Path) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if not data.strip() or b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def split_documents(
    texts: Sequence[tuple[str, bytes]],
    labeller: Labeller | None,
    val_fraction: float,
    feature_names: tuple[str, ...] = FEATURE_NAMES,
) -> Corpus:
    """Split named documents into train and validation, whole documents to one side.

    The first document trains; each later one goes to validation while validation holds less
    than ``val_fraction`` of the bytes seen so far. A single document is split at its tail.
    ``labeller`` gives each document's per-byte labels (``None``: no features).
    """
    if len(texts) == 1:  # one file: its tail is the validation set
        name, data = texts[0]
        cut = max(1, min(len(data) - 1, round(len(data) * (1.0 - val_fraction))))
        labels = labeller(name, data) if labeller is not None else None
        return Corpus(
            train=_bytes_tensor(data[:cut]),
            val=_bytes_tensor(data[cut:]),
            train_features=None if labels is None else labels[:cut],
            val_features=None if labels is None else labels[cut:],
            sources=(name,),
            feature_names=feature_names,
        )
    sides: dict[bool, list[tuple[str, bytes]]] = {False: [], True: []}
    seen = val_bytes = 0
    for index, (name, data) in enumerate(texts):
        to_val = index > 0 and val_bytes < val_fraction * seen  # first file trains; val trails p
        sides[to_val].append((name, data))
        seen += len(data)
        val_bytes += len(data) if to_val else 0
    train, val = (b"".join(data for _, data in sides[side]) for side in (False, True))
    return Corpus(
        train=_bytes_tensor(train),
        val=_bytes_tensor(val),
        train_features=_cat_labels(sides[False], labeller) if labeller is not None else None,
        val_features=_cat_labels(sides[True], labeller) if labeller is not None else None,
        sources=tuple(name for name, _ in texts),
        feature_names=feature_names,
    )


def _cat_labels(docs: list[tuple[str, bytes]], labeller: Labeller) -> Tensor:
    return torch.cat([labeller(n, d) for n, d in docs]) if docs else torch.zeros(0, dtype=torch.int64)


def _bytes_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64) if data else torch.zeros(0, dtype=torch.int64)


def batches(tokens: Tensor, *, batch_size: int, seq_len: int, seed: int) -> Iterator[Tensor]:
    """Endless deterministic random windows of ``tokens``.

    Yields:
        ``[batch_size, seq_len + 1]`` int64 windows: inputs are ``[:, :-1]``, labels ``[:, 1:]``.
        The same ``seed`` gives the same sequence of windows, whatever else runs.

    Raises:
        DataError: ``tokens`` is shorter than one window.
    """
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size={batch_size} and seq_len={seq_len} must both be >= 1.")
    if tokens.numel() < seq_len + 2:
        raise DataError(
            f"the data has {tokens.numel()} bytes, fewer than one window of {seq_len + 1}; "
            "add more text or lower the sequence length."
        )
    generator = torch.Generator().manual_seed(seed)
    window = torch.arange(seq_len + 1)  # [seq+1]
    while True:
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
        yield tokens[starts[:, None] + window[None, :]]  # [batch, seq+1]
