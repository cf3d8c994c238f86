"""Shared fixtures: real text batches. The tiny models live in ``l2e_optim._lab.zoo``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Without a GPU the Triton tap is tested on CPU tensors by Triton's interpreter, which must be on
# before anything imports triton (torch's dynamo does, e.g. at an optimizer's first step). With
# a GPU the real kernel runs (tests/test_cuda.py) and the interpreter stays off.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from l2e_optim._lab.zoo import stdlib_bytes  # noqa: E402

# Tiny models run fastest on one thread, and a second OpenMP thread spinning on a loaded 2-core
# machine can slow the suite several-fold.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def corpus() -> torch.Tensor:
    return stdlib_bytes()


def batches(corpus: torch.Tensor, batch: int, seq: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless random windows of the corpus, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, corpus.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([corpus[s : s + seq] for s in starts.tolist()])


#: Data paths the corpus loader (and so the CLI) must refuse, each with an error naming the path.
BAD_DATA = ("missing", "empty_file", "empty_folder", "binary", "latin1", "binary_folder")


def bad_data(tmp_path: Path, case: str) -> Path:
    """A data path named after ``case`` (one of :data:`BAD_DATA`), made as that case says."""
    path = tmp_path / case
    if case in ("empty_folder", "binary_folder"):
        path.mkdir()
    if case == "empty_file":
        path.write_bytes(b"")
    elif case == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif case == "latin1":
        path.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    elif case == "binary_folder":
        (path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return path


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts (keys in the same order) / lists / tuples / tensors equal to the bit: tensors of
    the same dtype and shape, NaN equal to NaN; other leaves by ``==``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all()), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)
