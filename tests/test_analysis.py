"""The analysis' pure functions against slow references and known distributions."""

from __future__ import annotations

import pytest
import torch

from l2e_optim._lab.analysis import (
    HIGH_MS_FACTOR,
    byte_context,
    gaussian_neuron_ms,
    ks_statistic,
    layer_scores,
    neuron_ms,
    position_selection,
)


def ks_reference(a: list[float], b: list[float]) -> float:
    """sup |F_a - F_b| by a plain loop over every observed value, float64."""
    best = 0.0
    for x in a + b:
        fa = sum(v <= x for v in a) / len(a)
        fb = sum(v <= x for v in b) / len(b)
        best = max(best, abs(fa - fb))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ks_matches_loop_reference_with_ties(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 12, (37,), generator=g).float() / 3  # ties within and across samples
    b = torch.randn(53, generator=g).round() + 1.0
    got = float(ks_statistic(a, b))
    assert got == pytest.approx(ks_reference(a.tolist(), b.tolist()), abs=1e-12)


def test_ks_extremes() -> None:
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert float(ks_statistic(x, x)) == 0.0
    assert float(ks_statistic(x, x + 100.0)) == 1.0
    with pytest.raises(ValueError):
        ks_statistic(x[:0], x)


def test_gaussian_neuron_ms_matches_sampling() -> None:
    z = torch.randn(400_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampled = float(neuron_ms(z * z))
    assert sampled == pytest.approx(gaussian_neuron_ms(), rel=0.03)


def test_sparse_neuron_is_high_ms_and_gaussian_is_not() -> None:
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(5000, generator=g)
    sparse = torch.where(torch.rand(5000, generator=g) < 0.005, 5.0, 0.0) + 0.01 * torch.randn(5000, generator=g)
    scores = neuron_ms(layer_scores(torch.stack([gaussian, sparse], dim=1)))
    cut = HIGH_MS_FACTOR * gaussian_neuron_ms()
    assert float(scores[0]) < cut < float(scores[1])


def test_byte_context_brackets_the_byte() -> None:
    tokens = torch.tensor(list(b"def foo(x):\n    return x"))
    assert byte_context(tokens, 6, before=4, after=3) == "f fo[o](x)"
    assert byte_context(tokens, 0, before=4, after=2) == "[d]ef"
    assert byte_context(tokens, 11, before=2, after=2) == "):[\\n]  "


def test_position_selection_separates_an_offset_first_position() -> None:
    # Position 0 sits 4 sigma off every neuron's mean, with its own (small) spread: pooled
    # statistics spend most of the top 2% on it, per-position statistics about its 1/16 share.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 16, 32, generator=g)
    z[:, 0] = 4.0 + 0.5 * torch.randn(200, 32, generator=g)
    shares = position_selection(z, ratio=0.02, first=2)
    assert shares is not None
    pooled, separate = shares["pooled"], shares["per_position"]
    assert len(pooled) == len(separate) == 3 and abs(sum(pooled) - 1) < 1e-9
    assert pooled[0] > 0.9
    assert separate[0] < 0.15 and separate[2] > 0.75
    assert position_selection(z[:1]) is None  # one window: no per-position variance
