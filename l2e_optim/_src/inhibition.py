"""The two inhibitions, as pure tensor functions.

L2E adds ``strength * L_MS`` in gradient space; MEmeL rewrites the forward value (Reverse
Deactivation). Both see mean/var/tau as they stand before the step (stop-gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor


def log_ms_grad(d: Tensor, selected: Tensor, log_eps: float, dsq: Tensor | None = None) -> Tensor:
    """d/dz of ``sum over selected of log((z - mean)^2 + log_eps)``, with ``d = z - mean``.

    Returns ``2 d / (d^2 + log_eps)`` where selected, 0 elsewhere (fp32, shape of ``d``);
    ``dsq`` may pass ``d * d`` when the caller already has it.
    """
    dsq = d * d if dsq is None else dsq
    # where, not a product with the mask: unselected entries are exactly 0 even where d is not finite.
    return torch.where(selected, 2.0 * d / (dsq + log_eps), 0.0)


def half_log_ms_grad_(d: Tensor, dsq: Tensor, selected: Tensor, log_eps: float) -> Tensor:
    """Half of :func:`log_ms_grad`, ``d / (d^2 + log_eps)`` where selected, computed in ``dsq``.

    Destroys ``dsq`` and returns it. The tap's backward no longer needs ``d * d`` once it has
    its sums and masks; reusing that buffer keeps the tap's transient memory at two fp32
    ``[tokens, N]`` tensors, and leaving the factor 2 to the caller's scalar saves a pass.
    """
    out = dsq.add_(log_eps)
    torch.div(d, out, out=out)
    return out.masked_fill_(~selected, 0.0)


def reverse_deactivation(z: Tensor, selected: Tensor, mean: Tensor, scale: float) -> Tensor:
    """MEmeL's Reverse Deactivation ``z' = (1 - m(1+Delta)) z + m (mean + Delta sg(z))``.

    The forward value of a selected element becomes the neuron's mean; its gradient is
    multiplied by ``-Delta``. Unselected elements pass through unchanged (value and gradient).

    Args:
        z: activations ``[..., neurons]``.
        selected: bool mask broadcastable to ``z``.
        mean: ``[neurons]`` running mean (no gradient).
        scale: Delta.
    """
    # mean + Delta * (sg(z) - z) is exactly `mean` in the forward (the bracket is exactly 0),
    # and its gradient is -Delta: the same value and gradient as the formula, without rounding.
    reversed_ = mean.to(z.dtype) + scale * (z.detach() - z)
    return torch.where(selected, reversed_, z)
