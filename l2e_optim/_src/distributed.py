"""Making step accumulators global: one all-reduce per step, through torch.distributed.

Every rank sums its own micro-batches; the sums (shifted by the running mean, which is identical
on every rank) add up exactly across ranks, so one SUM all-reduce of one flat buffer makes every
rank's statistics and thresholds those of the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor


class PendingReduce:
    """The step's all-reduce in flight; ``wait()`` returns once the global sums are in place."""

    def __init__(self, works: Sequence[object]) -> None:
        self._works = works

    def wait(self) -> None:
        """Block the stream (not the host, on NCCL) until the sums are in place."""
        for work in self._works:
            work.wait()  # type: ignore[attr-defined]


def world_size(group: dist.ProcessGroup | None) -> int:
    """Size of ``group`` (the default group when None); 1 without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def start_all_reduce(buffers: Sequence[Tensor], group: dist.ProcessGroup | None) -> PendingReduce | None:
    """Launch the SUM all-reduce of the accumulator buffers (async), or None with nobody to reduce with.

    There is one buffer per device holding sites (one, unless a single process spreads the model
    over several devices), so a step makes one collective.
    """
    if not buffers or world_size(group) == 1:
        return None
    works = [dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group, async_op=True) for buffer in buffers]
    return PendingReduce(works)
