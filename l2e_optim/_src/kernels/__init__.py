"""Fused implementations of the tap's backward, beside the eager one in ``site.py`` they replace.

One module per kernel (``native_tap``: one C loop built with the system's C compiler, CPU;
``blocked_tap``: token blocks of torch ops, CPU without a compiler; ``triton_tap``: one Triton
kernel, CUDA), chosen in one place (``dispatch``). Every kernel has the signature
:data:`FusedTap` and returns a :class:`TapResult`; the eager tap is the reference in the tests.
Nothing here imports triton at import time: ``import l2e_optim`` works without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor


class TapResult(NamedTuple):
    """What one site's backward produced for one micro-batch.

    Attributes:
        grad: ``[tokens, N]`` outgoing gradient; ``None`` when no incoming gradient was passed
            (no L2E gradient to add: the caller returns its gradient untouched).
        sums: ``[2N]`` fp32 shifted sums, s1 = sum of ``z - mean`` then s2 = sum of its square
            (padding rows weighted 0), in the order of the step accumulator.
        selected: 0-dim count of values at or above the threshold (padding excluded).
        finite: 0-dim bool, False when a NaN/inf reached the sums (the micro-batch is skipped
            and ``grad`` is the incoming gradient exactly).
    """

    grad: Tensor | None
    sums: Tensor
    selected: Tensor
    finite: Tensor


#: A fused tap backward, ``(z, grad, valid, mean, bar, scale, log_eps) -> TapResult``: one pass over
#: ``z`` and the incoming gradient. ``z``: ``[tokens, N]`` activation, any float dtype; ``grad``:
#: ``[tokens, N]`` incoming gradient, or ``None`` (statistics only); ``valid``: optional ``[tokens]``
#: fp32 0/1 padding weights; ``mean``: ``[N]`` fp32 shift (the running mean); ``bar``: ``[N]`` fp32,
#: ``tau * denominator`` (+inf before statistics exist): selected is ``(z - mean)^2 >= bar``, the
#: score comparison without dividing; ``scale``: 0-dim fp32 factor of
#: ``(z - mean) / ((z - mean)^2 + log_eps)`` in the outgoing gradient (0 in warm-up; the kernel
#: zeroes it itself for a non-finite micro-batch); ``log_eps``: delta of the log-MS penalty.
FusedTap = Callable[[Tensor, Tensor | None, Tensor | None, Tensor, Tensor, Tensor, float], TapResult]
