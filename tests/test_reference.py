"""The fast pure functions match the float64 loop references of algorithm.md."""

from __future__ import annotations

import math

import pytest
import torch

from l2e_optim import false_killing_rate, monosemanticity_scores, position_shares
from l2e_optim._src import reference
from l2e_optim._src.inhibition import half_log_ms_grad_, log_ms_grad, reverse_deactivation
from l2e_optim._src.selection import (
    initial_threshold,
    per_sample_topk_mask,
    per_token_topk_mask,
    sample_count,
    update_threshold,
)
from l2e_optim._src.statistics import merge_moments, moments_from_sums, shifted_sums


def heavy_tailed(tokens: int, n: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, n, generator=g)
    spikes = (torch.rand(tokens, n, generator=g) < 0.03) * torch.randn(tokens, n, generator=g) * 8
    return base + spikes + offset


def test_scores_match_reference() -> None:
    z = heavy_tailed(12, 9, 0)
    mean, var = torch.randn(9) * 0.1, torch.rand(9) + 0.1
    var[3] = 0.0  # a dead neuron stays finite thanks to the compensation
    fast = monosemanticity_scores(z, mean, var, eps=0.01)
    torch.testing.assert_close(fast.double(), reference.scores(z, mean, var, 0.01), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(fast).all()


def run_merges(batches: list[torch.Tensor], forget: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = batches[0].shape[1]
    count = torch.zeros((), dtype=torch.int64)
    mean, var = torch.zeros(n), torch.zeros(n)
    for batch in batches:
        d = batch - mean
        s1, s2 = shifted_sums(d, d * d, None)
        tokens = torch.tensor(float(batch.shape[0]))
        mu_b, var_b = moments_from_sums(tokens, s1, s2, mean)
        mean, var = merge_moments(count, mean, var, tokens, mu_b, var_b, forget)
        count = count + batch.shape[0]
    return mean, var


@pytest.mark.parametrize("forget", [None, 1, 3, 10])
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_merge_matches_reference(forget: int | None, offset: float) -> None:
    batches = [heavy_tailed(b, 5, seed, offset) for seed, b in enumerate([7, 3, 11, 1, 8, 8, 2, 9])]
    mean, var = run_merges(batches, forget)
    ref_mean, ref_var, count = [0.0] * 5, [0.0] * 5, 0
    for batch in batches:
        ref_mean, ref_var = reference.merge(count, ref_mean, ref_var, batch, forget)
        count += batch.shape[0]
    torch.testing.assert_close(mean.double(), torch.tensor(ref_mean, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), torch.tensor(ref_var, dtype=torch.float64), rtol=1e-4, atol=1e-5)


def test_merge_without_forgetting_is_exact_variance_of_all_values() -> None:
    batches = [heavy_tailed(b, 4, seed, 3.0) for seed, b in enumerate([5, 9, 2, 13])]
    mean, var = run_merges(batches, None)
    everything = torch.cat(batches).double()
    torch.testing.assert_close(mean.double(), everything.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), everything.var(0, unbiased=True), rtol=1e-4, atol=1e-5)


def test_merge_is_stable_with_large_offset() -> None:
    # Mean 1e4, std ~1: the naive E[x^2] - E[x]^2 in fp32 loses the variance entirely. Sums are
    # shifted by the running mean, so every step after the first is accurate; the first step
    # (shift 0) is the documented exception, and forgetting washes it out.
    batches = [heavy_tailed(64, 4, seed, 1e4) for seed in range(40)]
    mean, var = run_merges(batches, 3)
    ref_mean, ref_var, count = [0.0] * 4, [0.0] * 4, 0
    for batch in batches:
        ref_mean, ref_var = reference.merge(count, ref_mean, ref_var, batch, 3)
        count += batch.shape[0]
    torch.testing.assert_close(var.double(), torch.tensor(ref_var, dtype=torch.float64), rtol=2e-3, atol=0.0)
    naive = (torch.cat(batches[-4:]) ** 2).mean(0) - torch.cat(batches[-4:]).mean(0) ** 2
    assert (naive - torch.tensor(ref_var)).abs().max() > 1.0  # the naive form really fails here


def test_merge_with_empty_batch_changes_nothing() -> None:
    mean, var = torch.randn(3), torch.rand(3)
    zero = torch.zeros(())
    out_mean, out_var = merge_moments(torch.tensor(10), mean, var, zero, torch.zeros(3), torch.zeros(3), 10)
    assert torch.equal(out_mean, mean) and torch.equal(out_var, var)


def test_forgetting_makes_the_mean_an_ema() -> None:
    # After n_f constant-size batches the history is capped: weight 1/(n_f+1) on the new mean.
    n_f, b = 4, 10
    count = torch.tensor(1000)
    mean, var = torch.tensor([2.0]), torch.tensor([1.0])
    batch_mean = torch.tensor([7.0])
    new_mean, _ = merge_moments(count, mean, var, torch.tensor(float(b)), batch_mean, torch.tensor([0.5]), n_f)
    assert math.isclose(float(new_mean), 2.0 + (7.0 - 2.0) / (n_f + 1), rel_tol=1e-6)


def test_threshold_selection_matches_reference() -> None:
    z = heavy_tailed(16, 7, 1)
    mean, var = torch.zeros(7), torch.ones(7)
    phi = monosemanticity_scores(z, mean, var)
    tau = 3.0
    fast = {tuple(ix) for ix in (phi >= tau).nonzero().tolist()}
    assert fast == reference.threshold_selection(reference.scores(z, mean, var, 0.01), tau)
    assert fast  # the data has spikes: something must be selected


@pytest.mark.parametrize("k", [1, 2, 7, 20])
def test_topk_selection_matches_reference(k: int) -> None:
    phi = monosemanticity_scores(heavy_tailed(6, 7, 2), torch.zeros(7), torch.ones(7))
    fast = {tuple(ix) for ix in per_token_topk_mask(phi, k).nonzero().tolist()}
    assert fast == reference.topk_selection(phi, k)


@pytest.mark.parametrize("k", [1, 3, 40])
@pytest.mark.parametrize("padded", [False, True])
def test_sample_topk_selection_matches_reference(k: int, padded: bool) -> None:
    samples, positions, n = 3, 5, 7
    phi = monosemanticity_scores(heavy_tailed(samples * positions, n, 6), torch.zeros(n), torch.ones(n))
    valid = None
    if padded:  # sample 1 has 2 valid positions (14 values < k=40), sample 2 none
        valid = torch.ones(samples * positions)
        valid[7:] = 0.0
    fast = {tuple(ix) for ix in per_sample_topk_mask(phi, samples, k, valid).nonzero().tolist()}
    assert fast == reference.sample_topk_selection(phi, samples, k, valid)
    for b in range(samples):
        rows = range(b * positions, (b + 1) * positions)
        live = [t for t in rows if valid is None or valid[t] > 0]
        assert sum(t in rows for t, _ in fast) == min(k, len(live) * n)


def test_a_2d_activation_counts_each_row_as_a_sample() -> None:
    assert (sample_count((4, 6, 8)), sample_count((5, 8)), sample_count((8,))) == (4, 5, 1)
    phi = monosemanticity_scores(heavy_tailed(6, 7, 7), torch.zeros(7), torch.ones(7))
    assert torch.equal(per_sample_topk_mask(phi, sample_count(phi.shape), 2), per_token_topk_mask(phi, 2))


def test_position_shares() -> None:
    selected = torch.zeros(2, 5, 3, dtype=torch.bool)
    selected[0, 0, 1] = selected[1, 0, 2] = selected[1, 4, 0] = selected[0, 2, 2] = True
    torch.testing.assert_close(position_shares(selected, 2), torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    # more leading positions than the sequence has: zeros past it, nothing left for "the rest"
    wide = position_shares(selected, 7)
    torch.testing.assert_close(wide, torch.tensor([0.5, 0, 0.25, 0, 0.25, 0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(position_shares(selected, 0), torch.tensor([1.0], dtype=torch.float64))
    assert position_shares(torch.zeros(2, 5, 3, dtype=torch.bool), 2).sum() == 0
    with pytest.raises(ValueError, match=r"\[batch, seq, N\]"):
        position_shares(selected.reshape(10, 3), 2)


def test_log_ms_grad_matches_autograd_of_reference_penalty() -> None:
    z = heavy_tailed(10, 6, 3).double().requires_grad_(True)
    mean = torch.randn(6).double() * 0.1
    phi = monosemanticity_scores(z.detach(), mean, torch.ones(6))
    selected = reference.threshold_selection(phi, 2.0)
    reference.l2e_penalty(z, mean, selected, 1e-6).backward()
    mask = torch.zeros(10, 6, dtype=torch.bool)
    for t, i in selected:
        mask[t, i] = True
    fast = log_ms_grad(z.detach() - mean, mask, 1e-6)
    torch.testing.assert_close(fast, z.grad)


def test_in_place_log_ms_grad_matches_the_plain_one() -> None:
    d = heavy_tailed(10, 6, 5)
    d[0, 0] = float("inf")  # unselected non-finite entries must come out exactly 0
    selected = torch.rand(10, 6, generator=torch.Generator().manual_seed(1)) < 0.3
    selected[0, 0] = False
    plain = log_ms_grad(d, selected, 1e-6)
    fast = 2.0 * half_log_ms_grad_(d, d * d, selected, 1e-6)
    torch.testing.assert_close(fast, plain)
    assert fast[0, 0] == 0.0


def test_reverse_deactivation_matches_reference() -> None:
    z = heavy_tailed(5, 6, 4).requires_grad_(True)
    mean = torch.randn(6)
    phi = monosemanticity_scores(z.detach(), mean, torch.ones(6))
    mask = per_token_topk_mask(phi, 2)
    selected = {tuple(ix) for ix in mask.nonzero().tolist()}
    out = reverse_deactivation(z, mask, mean, 0.7)
    out.sum().backward()
    ref_out, ref_slope = reference.reverse_deactivation(z.detach(), mean, selected, 0.7)
    torch.testing.assert_close(out.detach().double(), ref_out)
    torch.testing.assert_close(z.grad.double(), ref_slope)


@pytest.mark.parametrize(("selected", "total"), [(0.0, 100.0), (2.0, 100.0), (7.0, 100.0), (90.0, 100.0), (5.0, 0.0)])
def test_threshold_update_matches_reference(selected: float, total: float) -> None:
    fast = update_threshold(torch.tensor(5.0), torch.tensor(selected), torch.tensor(total), 0.02, 0.05)
    assert math.isclose(float(fast), reference.threshold_update(5.0, selected, total, 0.02, 0.05), rel_tol=1e-6)


@pytest.mark.parametrize("ratio", [0.01, 0.02, 0.05])
def test_initial_threshold_is_the_gaussian_quantile(ratio: float) -> None:
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    empirical = float((x * x >= initial_threshold(ratio)).double().mean())
    assert abs(empirical - ratio) / ratio < 0.03


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.2])
def test_false_killing_rate_matches_reference(ratio: float) -> None:
    phi = monosemanticity_scores(heavy_tailed(40, 6, 5), torch.zeros(6), torch.ones(6))
    features = torch.arange(40) % 3
    fast = float(false_killing_rate(phi, features, ratio=ratio))
    assert math.isclose(fast, reference.false_killing_rate(phi, features, ratio), rel_tol=1e-9)


def test_false_killing_rate_is_zero_for_planted_monosemantic_neurons() -> None:
    # Neuron j fires only on tokens of feature j: every selection hits its own feature.
    features = torch.arange(300) % 3
    phi = torch.rand(300, 3) * 0.01
    phi[torch.arange(300), features] += 5.0
    assert float(false_killing_rate(phi, features, ratio=0.2)) == 0.0
    # Shuffle the neurons' firing away from their features: now most selections are false.
    shuffled = torch.rand(300, 3) * 0.01
    shuffled[torch.arange(300), torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(0))] += 5.0
    assert float(false_killing_rate(shuffled, features, ratio=0.2)) > 0.3


def test_false_killing_rate_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[tokens, N\]"):
        false_killing_rate(torch.rand(2, 3, 4), torch.zeros(2, dtype=torch.long), ratio=0.1)
    with pytest.raises(ValueError, match="ratio"):
        false_killing_rate(torch.rand(2, 3), torch.zeros(2, dtype=torch.long), ratio=0.0)
