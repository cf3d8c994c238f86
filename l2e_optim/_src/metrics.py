"""Measurement: the False Killing Rate (algorithm.md section 5). Pure tensor functions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor


def neuron_features(scores: Tensor, features: Tensor, num_features: int | None = None) -> Tensor:
    """Each neuron's relatively monosemantic feature ``l*_j = argmax_l mean_{t in l} phi_tj``.

    Args:
        scores: ``[tokens, N]`` monosemanticity scores.
        features: ``[tokens]`` integer feature label per token (>= 0).
        num_features: number of labels (default: ``features.max() + 1``).

    Returns:
        ``[N]`` int64 feature index per neuron. Features with no tokens never win.
    """
    if num_features is None:
        num_features = int(features.max()) + 1 if features.numel() else 1
    one_hot = F.one_hot(features.long(), num_features).to(torch.float64)  # [tokens, L]
    sums = one_hot.T @ scores.to(torch.float64)  # [L, N]
    counts = one_hot.sum(0)  # [L]
    means = sums / counts.clamp_min(1.0)[:, None]
    means = torch.where(counts[:, None] > 0, means, torch.full_like(means, -math.inf))
    return means.argmax(0)


def false_killing_rate(scores: Tensor, features: Tensor, *, ratio: float) -> Tensor:
    """The paper's False Killing Rate at inhibition level ``ratio``.

    The values selected for inhibition are those with ``phi >= tau_k``, ``tau_k`` the k-th
    largest score, ``k = ceil(ratio * tokens * N)``; a selection is *false* when the token's
    feature differs from the neuron's relatively monosemantic feature (see
    :func:`neuron_features`). Returns ``#false / #selected`` as a 0-dim float64 tensor.

    Args:
        scores: ``[tokens, N]`` monosemanticity scores (e.g. from ``monosemanticity_scores``).
        features: ``[tokens]`` integer feature label of each token.
        ratio: fraction of values inhibited, in (0, 1].
    """
    if scores.ndim != 2 or features.shape != scores.shape[:1]:
        raise ValueError(
            f"scores must be [tokens, N] and features [tokens]; got {tuple(scores.shape)} "
            f"and {tuple(features.shape)}. Flatten batch and sequence axes first."
        )
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r} must lie in (0, 1].")
    lstar = neuron_features(scores, features)  # [N]
    flat = rearrange(scores, "t n -> (t n)")
    k = max(1, math.ceil(ratio * flat.numel()))
    tau_k = torch.topk(flat, k).values[-1]
    selected = scores >= tau_k  # [tokens, N]
    false = selected & (features.long()[:, None] != lstar[None, :])
    return false.sum().to(torch.float64) / selected.sum().clamp_min(1).to(torch.float64)


def position_shares(selected: Tensor, first: int) -> Tensor:
    """Where selected values sit by position: the share at each of the first ``first`` positions,
    then the share at all later positions together.

    Args:
        selected: ``[batch, seq, N]`` bool, True at the values selected for inhibition.
        first: how many leading positions get their own share (>= 0).

    Returns:
        ``[first + 1]`` float64 shares summing to 1 (all 0 when nothing is selected); positions
        past ``seq`` get 0.
    """
    if selected.ndim != 3 or first < 0:
        raise ValueError(
            f"selected must be [batch, seq, N] and first >= 0; got {tuple(selected.shape)} and "
            f"first={first}. Reshape a flat [tokens, N] mask with its batch size first."
        )
    per_position = reduce(selected.to(torch.float64), "b t n -> t", "sum")  # [seq]
    head = F.pad(per_position[:first], (0, max(0, first - per_position.shape[0])))
    counts = torch.cat([head, per_position[first:].sum().reshape(1)])
    return counts / counts.sum().clamp_min(1.0)
