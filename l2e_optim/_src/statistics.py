"""Running per-neuron statistics: pure tensor functions, no state, no host sync.

A step's micro-batches are summed around a fixed shift K (the neuron's running mean before the
step, identical on every rank), which keeps the sums small and exact to all-reduce; the step's
moments are then merged into the running ones with the exact batch formula (Chan et al.; MEmeL
Lemma 3.2) and MEmeL's forgetting rule.
"""

from __future__ import annotations

import torch
from einops import reduce
from torch import Tensor


def shifted_sums(d: Tensor, dsq: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-neuron sums of ``d`` and ``d**2`` over token rows.

    Args:
        d: ``z - K`` in fp32, ``[tokens, neurons]``.
        dsq: ``d * d`` (the caller needs it for the scores too, so it is computed once).
        valid: optional ``[tokens]`` 0/1 weights (padding mask); ``None`` counts every row.
    """
    if valid is not None:
        # A [tokens] x [tokens, N] product: masks the rows without a masked [tokens, N] copy.
        return valid @ d, valid @ dsq
    return reduce(d, "t n -> n", "sum"), reduce(dsq, "t n -> n", "sum")


def moments_from_sums(
    tokens: Tensor, s1: Tensor, s2: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the values whose shifted sums are ``s1``, ``s2``.

    ``tokens`` may be 0 (the results are then 0 and must be masked by the caller).
    """
    b = tokens.clamp_min(1.0)
    centred_mean = s1 / b
    batch_var = (s2 / b - centred_mean * centred_mean).clamp_min(0.0)
    return shift + centred_mean, batch_var


def merge_moments(
    count: Tensor,
    mean: Tensor,
    var: Tensor,
    tokens: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    forget_steps: int | None,
) -> tuple[Tensor, Tensor]:
    """Merge a batch into running statistics (algorithm.md section 2).

    Args:
        count: tokens seen so far (m), 0-dim, any dtype.
        mean, var: running mean and *unbiased* variance, ``[neurons]`` fp32.
        tokens: tokens in the batch (b), 0-dim fp32.
        batch_mean, batch_var: the batch's mean and *biased* variance, ``[neurons]``.
        forget_steps: n_f; the history weighs at most n_f batches of this size, so the mean
            becomes an EMA with weight 1/(n_f+1); ``None`` merges exactly.

    Returns:
        ``(mean, var)`` after the merge; unchanged where ``tokens == 0``.
    """
    m = count.to(torch.float32)
    b = tokens.to(torch.float32)
    if forget_steps is not None:
        m = torch.minimum(m, forget_steps * b)
    total = m + b
    delta = mean - batch_mean
    new_mean = (m * mean + b * batch_mean) / total.clamp_min(1.0)
    denom = (total - 1.0).clamp_min(1.0)
    between = m * b * delta * delta / (denom * total.clamp_min(1.0))
    within = (b * batch_var + (m - 1.0).clamp_min(0.0) * var) / denom
    has_batch = b > 0
    return torch.where(has_batch, new_mean, mean), torch.where(has_batch, between + within, var)
