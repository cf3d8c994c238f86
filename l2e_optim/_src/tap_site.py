"""The tensors of one site that the tap reads and writes, as one named tuple."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .accumulator import accumulator_size


class TapSite(NamedTuple):
    """What ``_Tap`` and the C tap take of a site: its statistics, the step, its buffers.

    A tuple, so ``torch.compile`` passes it to the autograd function as a plain container of
    tensors; named, so code reads fields, not positions, and a new field is one edit here.
    """

    mean: Tensor  #: running mean, ``[N]`` or ``[R, N]``
    var: Tensor  #: running unbiased variance, shaped like ``mean``
    threshold: Tensor  #: 0-dim moving threshold tau
    token_count: Tensor  #: int64 tokens merged (``SiteState.count``): 0-dim or ``[R]``
    step: Tensor  #: the wrapper's 0-dim int64 step count (warm-up)
    accumulator: Tensor  #: the step's sums (``accumulator.py``'s layout)
    forward_sums: Tensor  #: the compiled forward's scratch copy of its sums (``tap._Tap.forward``)

    @classmethod
    def pooled(cls, mean: Tensor, var: Tensor, threshold: Tensor, token_count: Tensor, step: Tensor) -> TapSite:
        """A stand-alone pooled site with a zero accumulator and scratch (benchmarks, tests)."""
        acc = torch.zeros(accumulator_size(mean.shape[-1]), dtype=torch.float32, device=mean.device)
        return cls(mean, var, threshold, token_count, step, acc, torch.zeros_like(acc))
