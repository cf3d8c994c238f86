"""Slow, obviously-correct float64 references for every fast path (for tests only).

Plain Python loops over tokens and neurons, straight from algorithm.md; no vectorisation, so
nothing here can share a bug with the fast path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .statistics import MEAN_LIMIT, VAR_LIMIT  # the documented saturation, not its code


def scores(z: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """phi[t, i] = (z - mean_i)^2 / (var_i + eps * mean_j var_j)."""
    z, mean, var = z.double(), mean.double(), var.double()
    tokens, n = z.shape
    mean_var = sum(float(v) for v in var) / n
    out = torch.zeros(tokens, n, dtype=torch.float64)
    for t in range(tokens):
        for i in range(n):
            denom = max(float(var[i]) + eps * mean_var, torch.finfo(torch.float32).tiny)
            out[t, i] = (float(z[t, i]) - float(mean[i])) ** 2 / denom
    return out


def merge(
    count: float, mean: list[float], var: list[float], batch: Tensor, forget_steps: int | None
) -> tuple[list[float], list[float]]:
    """One step's merge, neuron by neuron: exact two-pass batch moments, then the formula.

    In float64 nothing overflows at these magnitudes; results saturate at the fp32 path's limits.
    """
    b = batch.shape[0]
    new_mean, new_var = [], []
    for i in range(batch.shape[1]):
        values = [float(v) for v in batch[:, i].double()]
        if b == 0:
            new_mean.append(mean[i])
            new_var.append(var[i])
            continue
        mu_b = sum(values) / b
        v_b = min(sum((v - mu_b) ** 2 for v in values) / b, VAR_LIMIT)
        mu_b = min(max(mu_b, -MEAN_LIMIT), MEAN_LIMIT)
        m = count if forget_steps is None else min(count, forget_steps * b)
        total = m + b
        new_mean.append(min(max((m * mean[i] + b * mu_b) / total, -MEAN_LIMIT), MEAN_LIMIT))
        if total <= 1:
            new_var.append(0.0)
            continue
        between = m * b * (mean[i] - mu_b) ** 2 / ((total - 1) * total)
        within = (b * v_b + max(m - 1, 0) * var[i]) / (total - 1)
        new_var.append(min(between + within, VAR_LIMIT))
    return new_mean, new_var


def position_row(t: int, rows: int) -> int:
    """Per-position statistics: position t's row (its own, or the shared tail row rows - 1)."""
    return min(t, rows - 1)


def scores_per_position(
    z: Tensor, mean: Tensor, var: Tensor, count: Tensor, eps: float
) -> Tensor:
    """phi[b, t, i] against row r = position_row(t): (z - mean_ri)^2 / (var_ri + eps * c), c the
    mean of var over every (row, neuron) of the rows with count >= 2 (a variance needs two values)."""
    batch, positions, n = z.shape
    rows = mean.shape[0]
    seen = [r for r in range(rows) if int(count[r]) >= 2]
    total = sum(float(var[r, i]) for r in seen for i in range(n))
    compensation = eps * total / (len(seen) * n) if seen else 0.0
    out = torch.zeros(batch, positions, n, dtype=torch.float64)
    for b in range(batch):
        for t in range(positions):
            r = position_row(t, rows)
            for i in range(n):
                denom = max(float(var[r, i]) + compensation, torch.finfo(torch.float32).tiny)
                out[b, t, i] = (float(z[b, t, i]) - float(mean[r, i])) ** 2 / denom
    return out


def merge_per_position(
    count: list[float],
    mean: list[list[float]],
    var: list[list[float]],
    z: Tensor,
    valid: Tensor | None,
    forget_steps: int | None,
) -> tuple[list[float], list[list[float]], list[list[float]]]:
    """One step's per-position merge: each row merges the (valid) values of its positions."""
    batch, positions, n = z.shape
    rows = len(count)
    new_count, new_mean, new_var = [], [], []
    for r in range(rows):
        values = [
            z[b, t]
            for b in range(batch)
            for t in range(positions)
            if position_row(t, rows) == r and (valid is None or float(valid[b, t]) > 0)
        ]
        block = torch.stack(values) if values else torch.zeros(0, n)
        m, v = merge(count[r], mean[r], var[r], block, forget_steps)
        new_count.append(count[r] + len(values))
        new_mean.append(m)
        new_var.append(v)
    return new_count, new_mean, new_var


def threshold_selection(phi: Tensor, tau: float) -> set[tuple[int, int]]:
    """The (token, neuron) pairs with phi >= tau."""
    return {(t, i) for t in range(phi.shape[0]) for i in range(phi.shape[1]) if float(phi[t, i]) >= tau}


def topk_selection(phi: Tensor, k: int) -> set[tuple[int, int]]:
    """Each token's k highest-scoring neurons (the per-token MEmeL variant)."""
    picked: set[tuple[int, int]] = set()
    for t in range(phi.shape[0]):
        ranked = sorted(range(phi.shape[1]), key=lambda i: -float(phi[t, i]))
        picked.update((t, i) for i in ranked[:k])
    return picked


def sample_topk_selection(
    phi: Tensor, samples: int, k: int, valid: Tensor | None = None
) -> set[tuple[int, int]]:
    """Each sample's k highest-scoring (token, neuron) pairs over all its positions (MEmeL's
    retrieval); tokens are sample-major, padding (``valid`` 0) never picked."""
    tokens, n = phi.shape
    per = tokens // samples
    picked: set[tuple[int, int]] = set()
    for b in range(samples):
        rows = [t for t in range(b * per, (b + 1) * per) if valid is None or float(valid[t]) > 0]
        pairs = [(t, i) for t in rows for i in range(n)]
        pairs.sort(key=lambda ti: -float(phi[ti[0], ti[1]]))
        picked.update(pairs[:k])
    return picked


def l2e_penalty(z: Tensor, mean: Tensor, selected: set[tuple[int, int]], log_eps: float) -> Tensor:
    """sum over selected (t, i) of log((z_ti - mean_i)^2 + delta), differentiable in z."""
    total = z.new_zeros((), dtype=torch.float64)
    for t, i in sorted(selected):
        d = z[t, i].double() - float(mean[i])
        total = total + torch.log(d * d + log_eps)
    return total


def reverse_deactivation(
    z: Tensor, mean: Tensor, selected: set[tuple[int, int]], scale: float
) -> tuple[Tensor, Tensor]:
    """Forward values and d(out)/dz of RD, element by element."""
    out = z.double().clone()
    slope = torch.ones_like(out)
    for t, i in selected:
        out[t, i] = float(mean[i])
        slope[t, i] = -scale
    return out, slope


def threshold_update(tau: float, selected: float, total: float, ratio: float, lr: float) -> float:
    """The moving threshold's rule, in Python floats."""
    if total == 0:
        return tau
    error = min((selected / total - ratio) / ratio, 9.0)
    return min(max(tau * math.exp(lr * error), 1e-4), 1e8)


def false_killing_rate(phi: Tensor, features: Tensor, ratio: float) -> float:
    """FKR by loops: l*_j by per-feature means, tau_k the k-th largest score."""
    tokens, n = phi.shape
    labels = sorted({int(f) for f in features})
    lstar = []
    for j in range(n):
        best, best_mean = None, -math.inf
        for label in labels:
            values = [float(phi[t, j]) for t in range(tokens) if int(features[t]) == label]
            mean = sum(values) / len(values)
            if mean > best_mean:
                best, best_mean = label, mean
        lstar.append(best)
    flat = sorted((float(v) for v in phi.flatten()), reverse=True)
    tau_k = flat[max(1, math.ceil(ratio * len(flat))) - 1]
    selected = [(t, j) for t in range(tokens) for j in range(n) if float(phi[t, j]) >= tau_k]
    false = [1 for t, j in selected if int(features[t]) != lstar[j]]
    return len(false) / len(selected)


def tap_backward(
    z: Tensor, grad: Tensor, valid: list[float] | None, mean: Tensor, var: Tensor, tau: float,
    eps: float, log_eps: float, coef: float,
) -> tuple[Tensor, list[float], list[float], int]:
    """The site's backward for one micro-batch with statistics, threshold retrieval, after warm-up.

    Returns ``(outgoing gradient, s1, s2, selected)``: the incoming gradient plus
    ``coef / tokens * d/dz sum over selected of log((z - mean)^2 + log_eps)``, and the shifted
    sums and the selected count over unpadded rows. ``z`` is ``[tokens, N]``; finite inputs only.
    """
    tokens, n = z.shape
    weight = valid if valid is not None else [1.0] * tokens
    phi = scores(z, mean, var, eps)
    picked = {(t, i) for t, i in threshold_selection(phi, tau) if weight[t] > 0}
    out = grad.double().clone()
    s1, s2 = [0.0] * n, [0.0] * n
    for t in range(tokens):
        for i in range(n):
            d = float(z[t, i]) - float(mean[i])
            s1[i] += weight[t] * d
            s2[i] += weight[t] * d * d
            if (t, i) in picked:
                out[t, i] += coef / max(sum(weight), 1.0) * 2.0 * d / (d * d + log_eps)
    return out, s1, s2, len(picked)
