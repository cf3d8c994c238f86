"""Positions of a site's activation and per-position statistic rows: pure tensor functions.

With ``statistics="per-position"`` a site keeps one mean and variance per (row, neuron): row t for
position t < max_positions, and one shared *tail* row (index max_positions) pooling every later
position. With pooled statistics there are no rows: one mean and variance per neuron.
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce
from torch import Tensor


def as_sequences(z: Tensor) -> Tensor:
    """``[sequences, positions, N]`` view of a site activation ``z``.

    The leading axis indexes sequences, every axis between it and the last one is a position
    (``[batch, seq, N]`` as is); a 2-D ``[rows, N]`` activation (no sequence axis) is one
    position per row, a 1-D ``[N]`` one sequence of one position.
    """
    if z.ndim == 1:
        return z[None, None]
    if z.ndim == 2:
        return z[:, None]
    return rearrange(z, "b ... n -> b (...) n")


def position_rows(positions: int, rows: int, device: torch.device) -> Tensor:
    """``[positions]`` int64: the statistic row of each position; positions >= rows - 1 share the tail row."""
    return torch.arange(positions, device=device).clamp_max(rows - 1)


def position_sums(
    d: Tensor, dsq: Tensor, valid: Tensor | None, rows: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row sums of ``d``, ``d**2`` and of the token weights, for per-position statistics.

    Args:
        d: ``z - K`` in fp32, ``[sequences, positions, N]`` (K the row's running mean).
        dsq: ``d * d``.
        valid: optional ``[sequences, positions]`` 0/1 weights (padding mask).
        rows: number of statistic rows R (max_positions + 1).

    Returns:
        ``s1 [R, N]``, ``s2 [R, N]``, ``tokens [R]`` (fp32).
    """
    b, t, n = d.shape
    if valid is None:
        s1_t, s2_t = reduce(d, "b t n -> t n", "sum"), reduce(dsq, "b t n -> t n", "sum")
        tokens_t = d.new_full((t,), float(b))
    else:
        s1_t = torch.einsum("bt,btn->tn", valid, d)
        s2_t = torch.einsum("bt,btn->tn", valid, dsq)
        tokens_t = reduce(valid, "b t -> t", "sum")
    index = position_rows(t, rows, d.device)
    s1 = d.new_zeros(rows, n).index_add_(0, index, s1_t)
    s2 = d.new_zeros(rows, n).index_add_(0, index, s2_t)
    return s1, s2, d.new_zeros(rows).index_add_(0, index, tokens_t)
