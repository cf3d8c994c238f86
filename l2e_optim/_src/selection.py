"""Scoring and retrieval of monosemantic (token, neuron) values: pure tensor functions."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from einops import rearrange, reduce
from torch import Tensor

from .position import as_sequences, position_rows
from .statistics import MIN_COUNT

#: The relative error (r - p) / p is at least -1 (r >= 0); it is clipped above at this value so
#: one outlier step moves tau by at most exp(threshold_lr * 9). A tighter, symmetric clip would
#: bias the fixed point: bursty steps with r > 2p would count as r = 2p and tau would settle low.
THRESHOLD_ERROR_MAX = 9.0
#: tau is clamped to this range: far outside it no real activation distribution can be.
THRESHOLD_BOUNDS = (1e-4, 1e8)


def score_denominator(var: Tensor, eps: float, seen: Tensor | None = None) -> Tensor:
    """``var + eps * mean(var)`` (MEmeL's variance compensation), floored above 0.

    ``var`` is ``[N]`` (pooled) or ``[rows, N]`` (per-position); with rows the mean runs over
    every (row, neuron) statistic, as the official code's does over (position, channel), but
    only over the rows that ``seen`` (``[rows]`` bool, default all) marks as holding data: rows
    no sequence has reached yet would otherwise dilute the compensation. The floor (fp32's
    smallest normal) only matters when every neuron is dead (all var 0).
    """
    if var.ndim == 1:
        compensation = eps * reduce(var, "n -> ()", "mean")
    else:
        weight = torch.ones_like(var[:, 0]) if seen is None else seen.to(var.dtype)  # [rows]
        total = (weight @ var).sum()
        compensation = eps * total / (weight.sum() * var.shape[1]).clamp_min(1.0)
    return (var + compensation).clamp_min(torch.finfo(torch.float32).tiny)


class TokenStatistics(NamedTuple):
    """A site's statistics as each token of a ``[sequences, positions, N]`` activation sees them.

    All three broadcast against ``[sequences, positions, N]``: ``[N]``/``[N]``/0-dim when pooled,
    ``[positions, N]``/``[positions, N]``/``[positions, 1]`` per-position.
    """

    shift: Tensor  #: running mean
    denom: Tensor  #: ``var + eps * mean(var)``
    seen: Tensor  #: bool: the statistic has merged MIN_COUNT tokens (else nothing is monosemantic yet)


def token_statistics(mean: Tensor, var: Tensor, count: Tensor, eps: float, positions: int) -> TokenStatistics:
    """Gather each position's statistic row (per-position), or pass pooled statistics through."""
    if mean.ndim == 1:
        return TokenStatistics(mean, score_denominator(var, eps), count >= MIN_COUNT)
    rows = position_rows(positions, mean.shape[0], mean.device)  # [positions]
    seen = count >= MIN_COUNT  # [rows]
    return TokenStatistics(mean[rows], score_denominator(var, eps, seen)[rows], seen[rows][:, None])


def monosemanticity_scores(
    z: Tensor, mean: Tensor, var: Tensor, *, eps: float = 0.01, count: Tensor | None = None
) -> Tensor:
    """Monosemanticity score ``phi = (z - mean)^2 / (var + eps * mean(var))`` of each value.

    Args:
        z: activations, ``[..., neurons]``, any float dtype (scored in fp32).
        mean: running mean of each neuron's earlier values, ``[neurons]``; or per-position
            statistics ``[rows, neurons]`` (``SiteState.mean`` with ``statistics="per-position"``):
            then ``z`` is ``[sequences, positions..., neurons]`` and position t uses row
            ``min(t, rows - 1)``.
        var: their unbiased running variance, shaped like ``mean``.
        eps: variance compensation (MEmeL, default 0.01); keeps dead neurons finite.
        count: per-position only, optional ``[rows]`` tokens per row: the compensation averages
            over the rows with data (at least two tokens; default: all rows).

    Returns:
        fp32 scores with the shape of ``z``.
    """
    if mean.ndim == 1:
        d = z.float() - mean.float()
        return d * d / score_denominator(var.float(), eps)
    z3 = as_sequences(z)
    if count is None:  # every row holds data
        count = torch.full((mean.shape[0],), MIN_COUNT, device=mean.device)
    stats = token_statistics(mean.float(), var.float(), count, eps, z3.shape[1])
    d = z3.float() - stats.shift
    return (d * d / stats.denom).reshape(z.shape)


def per_token_topk_mask(scores: Tensor, k: int) -> Tensor:
    """True at each token row's ``k`` highest scores (a per-token MEmeL variant). ``scores``: ``[tokens, N]``."""
    k = min(k, scores.shape[-1])
    top = torch.topk(scores, k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)


def sample_count(shape: torch.Size | tuple[int, ...]) -> int:
    """How many samples (sequences) an activation of this shape holds: its leading axis.

    ``[batch, seq, ..., N]`` holds ``batch`` samples whose positions are all the middle axes;
    a 2-D ``[rows, N]`` activation (a model with no sequence axis, or one that flattened it
    away) holds one sample per row; a 1-D ``[N]`` activation is one sample.
    """
    return shape[0] if len(shape) >= 2 else 1


def per_sample_topk_mask(scores: Tensor, samples: int, k: int, valid: Tensor | None = None) -> Tensor:
    """MEmeL's retrieval: True at each sample's ``k`` highest scores over all its positions x neurons.

    Args:
        scores: ``[tokens, N]``, tokens sample-major (``tokens = samples * positions``).
        samples: number of samples (see :func:`sample_count`).
        k: values per sample (at most positions x N); a static k, so no host sync.
        valid: optional ``[tokens]`` 0/1 weights; padding never takes a pick (a sample with
            fewer than ``k`` valid values gets only those).
    """
    if scores.numel() == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if valid is not None:
        scores = scores.masked_fill(valid[:, None] <= 0, -torch.inf)
    per_sample = rearrange(scores, "(b t) n -> b (t n)", b=samples)
    top = torch.topk(per_sample, min(k, per_sample.shape[-1]), dim=-1, sorted=False).indices
    mask = torch.zeros_like(per_sample, dtype=torch.bool).scatter_(-1, top, True)
    mask = rearrange(mask, "b (t n) -> (b t) n", n=scores.shape[-1])
    return mask if valid is None else mask & (valid[:, None] > 0)


def batch_topk_mask(scores: Tensor, ratio: float) -> Tensor:
    """True at the exact top ``ceil(ratio * scores.numel())`` scores of the whole batch.

    The in-batch global ranking that the moving threshold replaces (kept for ablations).
    """
    flat = scores.reshape(-1)
    k = max(1, math.ceil(ratio * flat.numel()))
    kth = torch.topk(flat, k, sorted=False).values.min()
    return scores >= kth


def retrieve(
    scores: Tensor, retrieval: str, tau: Tensor, ratio: float, topk: int, samples: int, valid: Tensor | None
) -> Tensor:
    """The values to inhibit under ``retrieval`` ("threshold", "sample-topk", "token-topk",
    "batch-topk", "random"); ``scores`` ``[tokens, N]`` of ``samples`` sample-major sequences.

    Padding (``valid`` 0) is never selected; only sample-topk must know it before ranking
    (elsewhere a padded row's picks are simply dropped).
    """
    if retrieval == "sample-topk":
        return per_sample_topk_mask(scores, samples, topk, valid)
    selected = _retrieve_unmasked(scores, retrieval, tau, ratio, topk)
    return selected if valid is None else selected & (valid[:, None] > 0)


def _retrieve_unmasked(scores: Tensor, retrieval: str, tau: Tensor, ratio: float, topk: int) -> Tensor:
    if retrieval == "threshold":
        return scores >= tau
    if retrieval == "batch-topk":
        return batch_topk_mask(scores, ratio)
    if retrieval == "random":
        return torch.rand_like(scores) < ratio
    return per_token_topk_mask(scores, topk)


def initial_threshold(ratio: float) -> float:
    """Chi-square(1) upper quantile of ``ratio``: the exact threshold for Gaussian activations.

    For x ~ N(mean, var), phi = (x-mean)^2/var ~ chi2(1) and P(phi >= t) = erfc(sqrt(t/2)).
    """
    return 2.0 * _erfcinv(ratio) ** 2


def update_threshold(
    tau: Tensor, selected: Tensor, total: Tensor, ratio: float, lr: float
) -> Tensor:
    """One O(1) step of the moving threshold (this project's rule, algorithm.md section 3).

    ``tau <- tau * exp(lr * min((r - ratio) / ratio, 9))`` with ``r = selected / total``,
    clamped to ``THRESHOLD_BOUNDS``; unchanged where ``total == 0``. A Robbins-Monro step on
    ``log tau``: multiplicative, so the step size scales with tau whatever the activation scale,
    and its fixed point is ``E[r] = ratio``: tau tracks the global (1 - ratio)-quantile of the
    scores, averaged over steps rather than ranked within one batch.
    """
    r = selected / total.clamp_min(1.0)
    error = ((r - ratio) / ratio).clamp_max(THRESHOLD_ERROR_MAX)
    new_tau = (tau * torch.exp(lr * error)).clamp(*THRESHOLD_BOUNDS)
    return torch.where(total > 0, new_tau, tau)


def _erfcinv(p: float) -> float:
    """Inverse complementary error function by bisection (no scipy dependency)."""
    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if math.erfc(mid) > p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
