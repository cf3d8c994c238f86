"""The tap's backward in token blocks of torch ops over preallocated buffers (CPU fast path).

No compiler: plain torch ops, but arranged so one block's ``[rows, N]`` working set stays in a
core's L2 cache, nothing is allocated per call but the outgoing gradient, and the slow CPU ops
are avoided. Measured on the Pythia-70M tap (``[512, 2048]`` fp32, one thread): a comparison
into a bool tensor costs twice one into fp32, and ``masked_fill`` / ``where`` with a bool mask
ten times a multiply; so the selection is an fp32 0/1 tensor, applied by multiplication. The
three per-neuron reductions (s1, s2, selected count) are one matrix-vector product over a block
laid out as ``[d | d^2 | selected]``, weighted by the padding mask as the eager path weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import TapResult

#: Values per token block: three fp32 buffers of this size (768 KiB) and the block's slices of z
#: and the gradient stay in a core's L2. Paired on [512, 2048] (00:40Z, load 11): 2^14 / 2^15 /
#: 2^16 / 2^17 / 2^18 / 2^19 values took 1.13 / 0.96 / 0.98 / 1 / 1.12 / 1.26 x the time of 2^17.
BLOCK_VALUES = 1 << 16


class BlockedTap:
    """A :class:`~l2e_optim._src.kernels.FusedTap` that owns its working buffers.

    One instance per wrapper: the sites' backward passes run one after another, so they share
    the buffers (the largest site's size, per device), which keep their storage across steps.
    """

    def __init__(self) -> None:
        self._blocks: dict[tuple[torch.device, int], Tensor] = {}

    def _block(self, device: torch.device, neurons: int) -> Tensor:
        """The ``[rows, 3N]`` buffer of a width: one per (device, N), whatever the token count."""
        key = (device, neurons)
        if key not in self._blocks:
            rows = max(1, BLOCK_VALUES // max(neurons, 1))
            self._blocks[key] = torch.empty(rows, 3 * neurons, dtype=torch.float32, device=device)
        return self._blocks[key]

    def __call__(
        self,
        z: Tensor,
        grad: Tensor | None,
        valid: Tensor | None,
        mean: Tensor,
        bar: Tensor,
        scale: Tensor,
        log_eps: float,
    ) -> TapResult:
        tokens, n = z.shape
        block = self._block(z.device, n)  # [rows, 3N]: d | d^2 | selected (0/1)
        rows = block.shape[0]
        weights = valid if valid is not None else block.new_ones(tokens)  # [tokens]
        # Padding is never selected; as a 0/1 factor that is one multiply per block. Its values
        # are zeroed first (as ``statistics.deviations`` does): a NaN there is not the batch's.
        pad = None if valid is None else (valid <= 0)[:, None]  # [tokens, 1]
        keep = None if valid is None else (valid > 0).to(torch.float32)[:, None]  # [tokens, 1]
        out = None if grad is None else torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        sums = block.new_zeros(3 * n)  # s1 | s2 | per-neuron selected counts
        for start in range(0, tokens, rows):
            stop = min(start + rows, tokens)
            work = block[: stop - start]
            d, dsq, over = work[:, :n], work[:, n : 2 * n], work[:, 2 * n :]
            torch.sub(z[start:stop], mean, out=d)
            if pad is not None and keep is not None:
                d.masked_fill_(pad[start:stop], 0.0)
            torch.mul(d, d, out=dsq)
            torch.ge(dsq, bar, out=over)
            if keep is not None:
                over.mul_(keep[start:stop])
            sums.addmv_(work.T, weights[start:stop])
            if out is not None:
                _half_log_ms_grad(d, dsq, over, log_eps, out[start:stop])
        counts, finite = sums[2 * n :], torch.isfinite(sums[n : 2 * n]).all()
        # Per-neuron counts are exact integers in fp32 (< 2^24 tokens); their total may not be.
        selected = counts.to(torch.int64).sum()
        if grad is not None and out is not None:
            factor = torch.where(finite, scale, 0.0).to(grad.dtype)
            torch.addcmul(grad, out, factor, out=out)
        return TapResult(out, sums[: 2 * n], selected, finite)


def _half_log_ms_grad(d: Tensor, dsq: Tensor, over: Tensor, log_eps: float, out: Tensor) -> None:
    """``out = d / (d^2 + log_eps)`` where selected, else 0 (``dsq`` is destroyed).

    A NaN/inf ``d`` gives NaN times 0 here; zeroing it keeps a skipped micro-batch's gradient
    exactly the incoming one (its scale is then 0). Where selected and finite, the value is at
    most ``1 / (2 sqrt(log_eps))``, so no finite value is touched.
    """
    torch.div(d, dsq.add_(log_eps), out=out)
    out.mul_(over)
    torch.nan_to_num_(out, nan=0.0, posinf=0.0, neginf=0.0)
