"""Running per-neuron statistics: pure tensor functions, no state, no host sync.

A step's micro-batches are summed around a fixed shift K (the neuron's running mean before the
step, identical on every rank), which keeps the sums small and exact to all-reduce; the step's
moments are then merged into the running ones with the exact batch formula (Chan et al.; MEmeL
Lemma 3.2) and MEmeL's forgetting rule.

Saturation: the running statistics stay within ``|mean| <= MEAN_LIMIT`` and ``var <= VAR_LIMIT``.
The merge is computed in a factored form whose every product stays below fp32's range, then
clamped there, so one finite spike (say a neuron reading 1e17) can never turn a statistic into
inf/NaN: a saved checkpoint always loads, and the spike decays like any other value. The limits
are far beyond any real activation (1e15, and its square) and small enough that the scores'
``mean(var)`` over a layer cannot overflow either.
"""

from __future__ import annotations

import torch
from einops import reduce
from torch import Tensor

#: Tokens a statistic must have merged before its scores mean anything: an unbiased variance
#: needs two values (after one token every var is 0 and every deviation would score as
#: monosemantic).
MIN_COUNT = 2
#: The running mean saturates at +-MEAN_LIMIT and the running variance at VAR_LIMIT
#: (= MEAN_LIMIT ** 2): the largest values a checkpoint can hold (state_dict.py checks them).
MEAN_LIMIT = 1e15
VAR_LIMIT = 1e30


def deviations(z: Tensor, shift: Tensor, valid: Tensor | None) -> Tensor:
    """``z - shift`` in fp32, with padded tokens (``valid == 0``) zeroed.

    ``z`` is ``[tokens, neurons]`` with ``valid`` ``[tokens]``, or ``[sequences, positions,
    neurons]`` with ``valid`` ``[sequences, positions]``; ``shift`` broadcasts against ``z``.

    A NaN or inf at a padded position is the padding's own business (e.g. an attention row with
    nothing to attend to): zeroed here, it cannot reach the sums, the scores or the skip test,
    so the micro-batch's real tokens still count. One expression, so a bf16 activation's fp32
    copy is freed at once; the fill is in place on that fresh tensor.
    """
    d = z.float() - shift
    if valid is not None:
        d.masked_fill_((valid <= 0)[..., None], 0.0)
    return d


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

    ``tokens`` may be 0 (the results are then 0 and must be masked by the caller). Sums that
    overflowed to inf (finite micro-batches whose total exceeds fp32) saturate at the limits.
    """
    b = tokens.clamp_min(1.0)
    centred_mean = s1 / b
    batch_var = s2 / b - centred_mean * centred_mean
    return saturate(shift + centred_mean, MEAN_LIMIT), saturate(batch_var, VAR_LIMIT).clamp_min(0.0)


def saturate(x: Tensor, limit: float) -> Tensor:
    """``x`` clamped to ``[-limit, limit]``, with NaN (inf - inf of overflowed sums) read as ``limit``."""
    return torch.nan_to_num(x, nan=limit, posinf=limit, neginf=-limit).clamp(-limit, limit)


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
        ``(mean, var)`` after the merge, saturated at ``MEAN_LIMIT`` / ``VAR_LIMIT``; unchanged
        where ``tokens == 0``.
    """
    m = count.to(torch.float32)
    b = tokens.to(torch.float32)
    if forget_steps is not None:
        m = torch.minimum(m, forget_steps * b)
    total = (m + b).clamp_min(1.0)
    denom = (m + b - 1.0).clamp_min(1.0)
    # Factored weights, each at most 2: m*b*delta^2 itself overflows fp32 for a shift of 3e12
    # at 4M tokens per step, while (m/total) * (b/denom) * delta^2 stays below VAR_LIMIT * 8.
    new_mean = (m / total) * mean + (b / total) * batch_mean
    delta = mean - batch_mean
    between = (m / total) * (b / denom) * (delta * delta)
    within = (b / denom) * batch_var + ((m - 1.0).clamp_min(0.0) / denom) * var
    new_var = saturate(between + within, VAR_LIMIT)
    has_batch = b > 0
    return torch.where(has_batch, saturate(new_mean, MEAN_LIMIT), mean), torch.where(has_batch, new_var, var)
