"""The tap's backward as one Triton kernel (CUDA; or CPU tensors under ``TRITON_INTERPRET=1``).

One pass: each program reads a ``[rows, BLOCK_N]`` stripe of ``z`` (and of the incoming
gradient), writes the outgoing gradient, and keeps per-neuron sums of ``d``, ``d^2`` and the
selection in fp32 registers; it writes them once, to its own row of a ``[programs, 3N]``
partials buffer. The partials are then summed over programs by one torch reduction in a fixed
order: no atomics, so the sums are bit-identical run to run. No host sync: the non-finite skip
is a device flag read by a second, tiny kernel that rewrites the gradient only when set (it
reads nothing else in the common, finite case). Both launches and the reductions have static
shapes, so the whole backward can be captured in a CUDA graph.

Importing this module imports triton; the dispatcher imports it only when it is chosen. The
kernels' parameters carry no Python annotations but ``tl.constexpr``: Triton's compiler resolves
annotations as globals (``Any`` fails to compile; the interpreter does not notice), so
``tests/test_kernels.py`` also compiles them for an sm_90 target, which needs no GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import TapResult

BLOCK_T = 32  # rows per tile
BLOCK_N = 128  # neurons per program (the stripe's width)
#: Enough programs to fill a large GPU several times over (an H100 has 132 SMs); fewer rows per
#: program would grow the partials buffer without adding parallelism.
TARGET_PROGRAMS = 1024
MAX_ROWS = 1024
COPY_BLOCK = 1024


@triton.jit  # type: ignore[untyped-decorator]
def _tap_backward_kernel(  # type: ignore[no-untyped-def]
    z_ptr, grad_ptr, out_ptr, valid_ptr, mean_ptr, bar_ptr, scale_ptr, part_ptr,
    tokens, neurons, rows_per_program, log_eps,
    HAS_VALID: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < neurons
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    bar = tl.load(bar_ptr + cols, mask=col_ok, other=float("inf"))
    scale = tl.load(scale_ptr)
    s1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    hits = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = pid_t * rows_per_program
    stop = tl.minimum(start + rows_per_program, tokens)
    for first in range(start, stop, BLOCK_T):
        rows = first + tl.arange(0, BLOCK_T)
        row_ok = rows < stop
        inside = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None].to(tl.int64) * neurons + cols[None, :]
        z = tl.load(z_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        # As ``statistics.deviations``: padding rows are zeroed (a NaN there is not the batch's),
        # never selected, and weigh 0 in the sums; without a mask every row weighs 1.
        if HAS_VALID:
            w = tl.load(valid_ptr + rows, mask=row_ok, other=0.0)
        else:
            w = row_ok.to(tl.float32)
        ok = inside & (w[:, None] > 0)  # the values that count
        d = tl.where(ok, z - mean[None, :], 0.0)
        dsq = d * d
        over = (dsq >= bar[None, :]) & ok
        s1 += tl.sum(w[:, None] * d, axis=0)
        s2 += tl.sum(w[:, None] * dsq, axis=0)
        hits += tl.sum(over.to(tl.float32), axis=0)
        if WRITE_GRAD:
            g = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            extra = tl.where(over, d / (dsq + log_eps), 0.0)
            tl.store(out_ptr + offsets, (g + scale * extra).to(out_ptr.dtype.element_ty), mask=inside)
    row = part_ptr + pid_t.to(tl.int64) * 3 * neurons
    tl.store(row + cols, s1, mask=col_ok)
    tl.store(row + neurons + cols, s2, mask=col_ok)
    tl.store(row + 2 * neurons + cols, hits, mask=col_ok)


@triton.jit  # type: ignore[untyped-decorator]
def _restore_if_nonfinite_kernel(grad_ptr, out_ptr, finite_ptr, numel, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    # A skipped micro-batch gets the incoming gradient back exactly; a finite one costs one load.
    if tl.load(finite_ptr) == 0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offsets < numel
        tl.store(out_ptr + offsets, tl.load(grad_ptr + offsets, mask=ok), mask=ok)


def rows_per_program(tokens: int, neurons: int) -> int:
    """Rows per program: a multiple of BLOCK_T, aiming at TARGET_PROGRAMS programs in all."""
    stripes = triton.cdiv(neurons, BLOCK_N)
    wanted = triton.cdiv(tokens, max(1, TARGET_PROGRAMS // stripes))
    return int(min(MAX_ROWS, triton.cdiv(max(wanted, 1), BLOCK_T) * BLOCK_T))


def triton_tap(
    z: Tensor,
    grad: Tensor | None,
    valid: Tensor | None,
    mean: Tensor,
    bar: Tensor,
    scale: Tensor,
    log_eps: float,
) -> TapResult:
    """The :class:`~l2e_optim._src.kernels.FusedTap` of this module."""
    tokens, n = z.shape
    z = z.contiguous()
    grad = None if grad is None else grad.contiguous()
    out = None if grad is None else torch.empty_like(grad)
    rows = rows_per_program(tokens, n)
    grid = (triton.cdiv(tokens, rows), triton.cdiv(n, BLOCK_N))
    partials = torch.empty(grid[0], 3 * n, dtype=torch.float32, device=z.device)
    _tap_backward_kernel[grid](
        z, z if grad is None else grad, z if out is None else out, z if valid is None else valid,
        mean, bar, scale, partials, tokens, n, rows, log_eps,
        HAS_VALID=valid is not None, WRITE_GRAD=grad is not None, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N,
    )
    sums = partials.sum(0)  # [3N], a fixed-order reduction: deterministic
    finite = torch.isfinite(sums[n : 2 * n]).all()
    selected = sums[2 * n :].to(torch.int64).sum()  # per-neuron counts are exact in fp32
    if grad is not None and out is not None:
        numel = grad.numel()
        _restore_if_nonfinite_kernel[(triton.cdiv(numel, COPY_BLOCK),)](
            grad, out, finite.to(torch.int32), numel, BLOCK=COPY_BLOCK
        )
    return TapResult(out, sums[: 2 * n], selected, finite)
