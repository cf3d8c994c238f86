"""Layout of a site's step accumulator: one flat fp32 block, all-reduced with every other site's.

``[s1 (rows x N), s2 (rows x N), tokens (rows), selected, nonfinite]``: the shifted sums and token
counts of each statistic row (one row when pooled), then the step's count of values over the
threshold and of skipped micro-batches. Pooled statistics have no row axis (``rows=None``) and the
same layout as one row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Pending(NamedTuple):
    """Views into a site's accumulator (writing them writes the accumulator)."""

    s1: Tensor  #: ``[N]`` or ``[rows, N]``: sum of ``z - K`` over the step's tokens
    s2: Tensor  #: the same shape: sum of ``(z - K)^2``
    tokens: Tensor  #: 0-dim or ``[rows]``: tokens summed
    selected: Tensor  #: 0-dim: values with score >= the threshold
    nonfinite: Tensor  #: 0-dim: micro-batches skipped for NaN/inf


def accumulator_size(neurons: int, rows: int | None = None) -> int:
    """Length of a site's accumulator; ``rows`` None for pooled statistics."""
    r = 1 if rows is None else rows
    return 2 * r * neurons + r + 2


def pending(acc: Tensor, neurons: int, rows: int | None = None) -> Pending:
    """Split ``acc`` into its named views (no copy)."""
    r = 1 if rows is None else rows
    shape = (neurons,) if rows is None else (rows, neurons)
    size = r * neurons
    tokens = acc[2 * size : 2 * size + r]
    return Pending(
        s1=acc[:size].view(shape),
        s2=acc[size : 2 * size].view(shape),
        tokens=tokens.view(()) if rows is None else tokens,
        selected=acc[2 * size + r],
        nonfinite=acc[2 * size + r + 1],
    )


def accumulate(acc: Pending, s1: Tensor, s2: Tensor, tokens: Tensor, selected: Tensor, finite: Tensor) -> None:
    """Add one micro-batch's sums to the step's, unless it had NaN/inf (``finite`` a device bool).

    ``selected`` is the 0-dim count of values over the threshold.
    """
    zero = torch.zeros((), dtype=acc.s1.dtype, device=acc.s1.device)
    acc.s1.add_(torch.where(finite, s1, zero))
    acc.s2.add_(torch.where(finite, s2, zero))
    acc.tokens.add_(torch.where(finite, tokens.to(zero.dtype), zero))
    acc.selected.add_(torch.where(finite, selected.to(zero.dtype), zero))
    acc.nonfinite.add_((~finite).to(zero.dtype))
