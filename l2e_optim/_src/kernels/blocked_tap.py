"""The tap's backward in token blocks of torch ops over preallocated buffers (CPU, no compiler).

No compiler: plain torch ops, arranged so one block's ``[rows, N]`` working set stays in a core's
L2 cache and nothing is allocated per call (the outgoing gradient reuses its storage while it is
free, see ``BlockedTap._output``). Per block, seven passes:
``d = z - mean``, ``d^2``, the selection (an fp32 0/1 tensor: a comparison into bool costs twice
one into fp32 on CPU, and ``masked_fill``/``where`` with a bool mask ten times a multiply), one
matrix-vector product for the three per-neuron sums over the block laid out as ``[d | d^2 |
selected]`` (weighted by the padding mask as the eager path weights), and the gradient as
``grad + scale * (d * selected) / (d^2 + log_eps)`` (``d * selected`` and ``d^2 + log_eps`` in
place, one ``addcdiv`` into the output block). CPU tensors only (``check_kernel``): the
finiteness of the sums and the penalty's scale are read on the host, which costs nothing there
and saves a pass per block (a non-finite micro-batch's output is overwritten once at the end).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import TapResult

#: Values per token block: three fp32 buffers of this size (768 KiB) and the block's slices of z,
#: the gradient and the output stay in a core's L2. Paired on [512, 2048] (00:40Z, load 11):
#: 2^14 / 2^15 / 2^16 / 2^17 / 2^18 / 2^19 values took 1.13 / 0.96 / 0.98 / 1 / 1.12 / 1.26 x
#: the time of 2^17.
BLOCK_VALUES = 1 << 16


class BlockedTap:
    """A :class:`~l2e_optim._src.kernels.FusedTap` that owns its working buffers.

    One instance per wrapper: the sites' backward passes run one after another, so they share
    the buffers (one per width), which keep their storage across steps.
    """

    def __init__(self) -> None:
        self._blocks: dict[tuple[torch.device, int], Tensor] = {}
        self._outputs: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _output(self, grad: Tensor) -> Tensor:
        """Storage for the outgoing gradient: the last call's, when nothing else holds it.

        A fresh ``[tokens, N]`` tensor per call page-faults its whole size on first write when
        the heap has given that memory back (measured in a Pythia-70M step: ~800 minor faults
        and +1.2 ms per 4 MiB call, a third of the call). The previous output is normally free
        again by the next site's backward (the next node consumed it); while anything still
        references its storage (autograd's buffers, a hook, a ``.grad``), a new one is made.
        One buffer per (device, dtype), grown to the largest micro-batch seen.
        """
        key, numel = (grad.device, grad.dtype), grad.numel()
        base = self._outputs.get(key)
        # Two references when free: `base` itself and the temporary storage object asking.
        if base is None or base.numel() < numel or torch._C._storage_Use_Count(base.untyped_storage()._cdata) != 2:
            base = torch.empty(numel, dtype=grad.dtype, device=grad.device)
            self._outputs[key] = base
        return base[:numel].view(grad.shape)

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
        # Padding's values are zeroed first (as ``statistics.deviations`` does: a NaN there is
        # not the batch's); a zero is never selected (bar > 0), so padding needs nothing else.
        pad = None if valid is None else (valid <= 0)[:, None]  # [tokens, 1]
        factor = float(scale)  # sync-ok: a CPU tensor (the blocked tap runs on CPU only)
        # No penalty (warm-up, no statistics yet, monitoring): the gradient passes untouched.
        out = None if grad is None or factor == 0.0 else self._output(grad)
        sums = block.new_zeros(3 * n)  # s1 | s2 | per-neuron selected counts
        for start in range(0, tokens, rows):
            stop = min(start + rows, tokens)
            work = block[: stop - start]
            d, dsq, over = work[:, :n], work[:, n : 2 * n], work[:, 2 * n :]
            torch.sub(z[start:stop], mean, out=d)
            if pad is not None:
                d.masked_fill_(pad[start:stop], 0.0)
            torch.mul(d, d, out=dsq)
            torch.ge(dsq, bar, out=over)
            sums.addmv_(work.T, weights[start:stop])
            if out is not None and grad is not None:
                # Where selected and finite, |d / (d^2 + log_eps)| <= 1 / (2 sqrt(log_eps)).
                torch.addcdiv(grad[start:stop], d.mul_(over), dsq.add_(log_eps), value=factor, out=out[start:stop])
        counts, finite = sums[2 * n :], torch.isfinite(sums[n : 2 * n]).all()
        # Per-neuron counts are exact integers in fp32 (< 2^24 tokens); their total may not be.
        selected = counts.to(torch.int64).sum()
        if out is not None and grad is not None and not bool(finite):  # sync-ok: CPU
            out.copy_(grad)  # a skipped micro-batch: exactly the incoming gradient
        return TapResult(grad if out is None else out, sums[: 2 * n], selected, finite)
