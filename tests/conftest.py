"""Shared fixtures: real text batches. The tiny models live in ``l2e_optim._lab.zoo``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from l2e_optim._lab.zoo import stdlib_bytes

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
