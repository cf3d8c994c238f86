"""Making step accumulators global: one all-reduce per step, through torch.distributed.

Every rank sums its own micro-batches; the sums (shifted by the running mean, which is identical
on every rank) add up exactly across ranks, so one SUM all-reduce of one flat buffer makes every
rank's statistics and thresholds those of the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class PendingReduce:
    """An all-reduce in flight; ``wait()`` copies the global sums back into the accumulators."""

    def __init__(self, work: object | None, flat: Tensor, parts: Sequence[Tensor]) -> None:
        self._work = work
        self._flat = flat
        self._parts = parts

    def wait(self) -> None:
        """Block the stream (not the host, on NCCL) until the sums are in place."""
        if self._work is not None:
            self._work.wait()  # type: ignore[attr-defined]
        if len(self._parts) > 1:
            offset = 0
            for part in self._parts:
                part.copy_(self._flat[offset : offset + part.numel()])
                offset += part.numel()


def world_size(group: dist.ProcessGroup | None) -> int:
    """Size of ``group`` (the default group when None); 1 without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def start_all_reduce(
    accumulators: Sequence[Tensor], group: dist.ProcessGroup | None
) -> PendingReduce | None:
    """Launch the step's single all-reduce (async), or return None when there is nobody to reduce with."""
    if not accumulators or world_size(group) == 1:
        return None
    flat = accumulators[0] if len(accumulators) == 1 else torch.cat(list(accumulators))
    work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return PendingReduce(work, flat, accumulators)
