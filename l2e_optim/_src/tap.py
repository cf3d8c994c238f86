"""The autograd tap: identity in forward; in backward, the site's statistics and L2E gradient.

Statistics are gathered in the *backward* pass, by an identity autograd function that the site's
hook (``site.py``) places on the activation. For one micro-batch its backward adds the shifted
sums, the token count and the selected count into the site's step accumulator (skipping a
micro-batch with a NaN/inf among its real tokens) and adds ``strength * dL_MS/dz`` to the incoming
gradient. The eager backward below is the reference; a fused kernel (``kernels/``, chosen per
call by ``kernels.dispatch``) does the pooled, threshold case in one pass over the activation;
the C tap does the whole backward, bar and accumulation included, in one call. Under
``torch.compile`` the tap is traced instead: the sums are computed in the forward (fused with the
kernel producing the activation) and still added to the accumulator by the backward, so a
micro-batch counts once, and only when it has a backward.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from .accumulator import accumulate, pending
from .inhibition import half_log_ms_grad_
from .kernels import FusedTap
from .kernels.native_tap import DTYPES, NativeTap
from .position import as_sequences, position_sums
from .selection import TokenStatistics, retrieve, sample_count, token_statistics
from .statistics import deviations, shifted_sums
from .tap_site import TapSite


class _Tap(torch.autograd.Function):
    """Identity in forward; in backward, accumulates the site's statistics and adds the L2E grad."""

    @staticmethod
    def forward(
        ctx: Any,
        z: Tensor,
        valid: Tensor | None,
        site: TapSite,
        options: tuple[float, float, float, int, str, float, int],
        loss_scale: Tensor | None = None,
        fused: FusedTap | None = None,
    ) -> Tensor:
        ctx.site = site
        ctx.options = options
        ctx.loss_scale = loss_scale
        ctx.fused = fused
        if fused is None and _traced():
            # Compiled: the sums in the forward, where Inductor computes them in the kernel that
            # produces z; saved for the backward to add (once, also under checkpointing). Written
            # to the site's forward_sums as well, which nothing reads: a value only the backward
            # uses is recomputed there by the partitioner (the min cut keeps reductions in the
            # forward only when a forward output needs them), a second pass over the saved z.
            # forward=True: a count CSE cannot merge with the backward's selection, which would
            # be saved as a [tokens, N] bool mask (Inductor's CPU code stores it byte by byte:
            # 10 ms a Pythia-70M site). Measured: docs/benchmarks.md.
            seen = _observed(z, valid, site, options[0], traced=True, forward=True)
            sums = _batch_sums(seen)
            _record(site.forward_sums, sums, z.shape[-1], seen.rows)
            ctx.save_for_backward(z, valid, *sums)
        else:
            ctx.save_for_backward(z, valid)
        return z.view_as(z)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        z, valid, *early = ctx.saved_tensors
        if isinstance(ctx.fused, NativeTap) and z.dtype in DTYPES:
            out = ctx.fused.site_backward(z, grad, valid, ctx.site, ctx.options, ctx.loss_scale)
            return out, None, None, None, None, None
        if ctx.fused is not None:
            return _fused_backward(ctx, z, valid, grad), None, None, None, None, None
        site: TapSite = ctx.site
        eps, log_eps, coef, warmup, retrieval, ratio, topk = ctx.options
        traced = bool(early) or _traced()
        seen = _observed(z, valid, site, eps, traced)
        d, dsq, over, stats = seen.d, seen.dsq, seen.over, seen.stats
        s1, s2, tokens, hits, finite = early if early else _batch_sums(seen)
        n = z.shape[-1]
        accumulate(pending(site.accumulator, n, seen.rows), s1, s2, tokens, hits, finite)
        if coef == 0.0:
            return grad, None, None, None, None, None
        selected = over
        if retrieval != "threshold":
            scores = (dsq / stats.denom).view(-1, n)
            picked = retrieve(scores, retrieval, site.threshold, ratio, topk, sample_count(z.shape), valid)
            selected = picked.view(d.shape) & stats.seen
        scale = _penalty_scale(coef, tokens.sum(), finite & (site.step >= warmup), ctx.loss_scale)
        if traced:
            return _traced_penalty(grad, d, dsq, selected, scale, finite, log_eps), None, None, None, None, None
        # A skipped micro-batch's scale is 0, but 0 * (inf / inf) is NaN: its selection goes too.
        extra = half_log_ms_grad_(d, dsq, selected & finite, log_eps).reshape(grad.shape).to(grad.dtype)
        return torch.addcmul(grad, extra, scale.to(grad.dtype)), None, None, None, None, None


class _Observed(NamedTuple):
    """One micro-batch against a site's statistics (``[sequences, positions, N]`` tensors)."""

    d: Tensor  #: fp32 ``z - mean``, padding zeroed
    dsq: Tensor  #: ``d * d``
    over: Tensor  #: at or above the threshold (padding excluded): bool, or fp32 0/1 when traced
    stats: TokenStatistics
    valid: Tensor | None  #: ``[sequences, positions]`` padding weights
    rows: int | None  #: per-position statistic rows; None when pooled


def _observed(
    z: Tensor, valid: Tensor | None, site: TapSite, eps: float, traced: bool, forward: bool = False
) -> _Observed:
    """``z`` against the site's statistics; ``forward``: as the compiled forward counts (below)."""
    mean = site.mean
    z3 = as_sequences(z)  # [sequences, positions, N]
    stats = token_statistics(mean, site.var, site.token_count, eps, z3.shape[1])
    valid3 = None if valid is None else valid.view(z3.shape[:2])  # [sequences, positions]
    # Shift K = running mean: identical on every rank, keeps the sums small.
    d = deviations(z3, stats.shift, valid3)  # [sequences, positions, N]
    dsq = d * d
    bar = _threshold_bar(stats, site.threshold)
    # What the moving threshold counts, whatever inhibits. The compiled forward compares
    # dsq - bar with 0: the same values (IEEE subtraction rounds monotonically, so a - b >= 0
    # exactly when a >= b for finite a and b; an infinite bar, no statistics yet, gives -inf,
    # not counted either way; a NaN/inf dsq skips the micro-batch; only with denormals flushed
    # to zero could a < b by less than the smallest normal count), but a graph node of its
    # own, so CSE cannot merge it with the backward's selection (see _Tap.forward).
    over = (dsq - bar) >= 0 if forward else dsq >= bar
    if valid3 is not None:
        over &= valid3[..., None] > 0
    if traced:
        # One fp32 0/1 tensor for the count and the penalty: Inductor's CPU code stores and
        # applies a bool mask far slower than it multiplies (see _traced_penalty).
        over = over.to(torch.float32)
    return _Observed(d, dsq, over, stats, valid3, None if mean.ndim == 1 else mean.shape[0])


def _batch_sums(seen: _Observed) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(s1, s2, tokens, selected count, finite)`` of one micro-batch, as ``accumulate`` takes them."""
    d, dsq = seen.d, seen.dsq
    n = d.shape[-1]
    if seen.rows is None:
        valid = None if seen.valid is None else seen.valid.reshape(-1)
        if seen.over.dtype == torch.bool:  # eager
            s1, s2 = shifted_sums(d.view(-1, n), dsq.view(-1, n), valid)
        else:  # traced: d is zero on padding, so plain column sums are the weighted ones
            s1, s2 = _column_sums(d.view(-1, n)), _column_sums(dsq.view(-1, n))
        tokens = _token_count(valid, d.view(-1, n))
    else:
        s1, s2, tokens = position_sums(d, dsq, seen.valid, seen.rows)
    # Any NaN/inf in z makes its neuron's s2 NaN/inf: checking [N] instead of [tokens, N].
    # A device bool, so skipping the micro-batch costs no host sync.
    finite = torch.isfinite(s2).all()
    return s1, s2, tokens, _selected_count(seen.over.view(-1, n)), finite


def _record(forward_sums: Tensor, sums: tuple[Tensor, ...], n: int, rows: int | None) -> None:
    """Write one micro-batch's ``_batch_sums`` into ``forward_sums`` (the accumulator's layout)."""
    s1, s2, tokens, hits, finite = sums
    out = pending(forward_sums, n, rows)
    out.s1.copy_(s1)
    out.s2.copy_(s2)
    out.tokens.copy_(tokens)
    out.selected.copy_(hits)
    out.nonfinite.copy_(~finite)


def _column_sums(x: Tensor) -> Tensor:
    """``x.sum(0)`` of a ``[tokens, N]`` tensor in two stages, for ``torch.compile``'s CPU code.

    Inductor reduces over the rows of a row-major tensor 16 columns at a time down all the rows,
    an 8 KiB stride at N = 2048 that defeats the prefetcher on data coming from memory. Summing
    blocks of up to 16 rows first (a ``[tokens / R, R, N]`` view) keeps each pass within a few
    pages: on one ``[512, 2048]`` site with a cold cache 0.64 ms against 1.12 ms (one stage) and
    0.67 ms for the C tap's loop. The rows are added in another order than ``sum(0)``'s: fp32
    rounding differs, not the result's meaning.
    """
    tokens = x.shape[0]
    rows = next(r for r in (16, 8, 4, 2, 1) if tokens % r == 0)
    if rows == 1:
        return x.sum(0)
    return x.view(tokens // rows, rows, x.shape[1]).sum(1).sum(0)


def _fused_backward(ctx: Any, z: Tensor, valid: Tensor | None, grad: Tensor) -> Tensor:
    """The tap's backward by a fused kernel (``ctx.fused``; pooled statistics, threshold)."""
    site: TapSite = ctx.site
    mean = site.mean
    eps, log_eps, coef, warmup = ctx.options[:4]
    z2 = rearrange(z, "... n -> (...) n")  # [tokens, N]
    bar = _threshold_bar(token_statistics(mean, site.var, site.token_count, eps, 1), site.threshold)  # [N]
    tokens = _token_count(valid, z2)
    # Without the finiteness of the sums, which the kernel learns only at the end: it zeroes
    # the penalty of a skipped micro-batch itself.
    scale = _penalty_scale(coef, tokens, site.step >= warmup, ctx.loss_scale)
    g2 = None if coef == 0.0 else rearrange(grad, "... n -> (...) n")
    result = ctx.fused(z2, g2, valid, mean, bar, scale, log_eps)
    n = mean.shape[0]
    s1, s2 = result.sums[:n], result.sums[n:]
    accumulate(pending(site.accumulator, n, None), s1, s2, tokens, result.selected, result.finite)
    return grad if result.grad is None else result.grad.view(grad.shape)


def _traced() -> bool:
    """Whether ``torch.compile`` is tracing the backward: then the traced form below is used
    (``benchmarks.traced_tap`` patches this to time the eager form traced instead)."""
    return torch.compiler.is_compiling()


def _selected_count(over: Tensor) -> Tensor:
    """How many of ``over`` ``[tokens, N]`` (bool, or fp32 0/1 when traced) are set: 0-dim int64.

    Bool: ``count_nonzero`` (a bool ``.sum()`` widens the mask to int64 first, ~15x slower on
    CPU). fp32: per-neuron column sums (exact below 2^24 tokens), a reduction over the same rows
    as the shifted sums', which Inductor computes with them.
    """
    if over.dtype == torch.bool:
        return torch.count_nonzero(over)
    return _column_sums(over).to(torch.int64).sum()


def _traced_penalty(
    grad: Tensor, d: Tensor, dsq: Tensor, selected: Tensor, scale: Tensor, finite: Tensor, log_eps: float
) -> Tensor:
    """The outgoing gradient as ``torch.compile`` should see it: the selection as an fp32 factor.

    The same values as the eager ``half_log_ms_grad_`` + ``addcmul`` (rounded once, in fp32), in
    a form Inductor's CPU code runs fast: on one ``[512, 2048]`` site the eager form traced costs
    13.7 ms over GELU's compiled forward and backward, the traced form (with its sums in the
    forward) 2.0 ms (``benchmarks.traced_tap``; docs/benchmarks.md). ``d * 0`` is NaN for a NaN
    ``d``, so a skipped micro-batch (``finite`` false) returns ``grad`` exactly by a ``where`` on
    the 0-dim flag (an inf value's ``d * 0`` is NaN too).
    """
    extra = d * selected.to(torch.float32) / (dsq + log_eps)
    penalized = (grad.float() + scale * extra.reshape(grad.shape)).to(grad.dtype)
    return torch.where(finite, penalized, grad)


def _threshold_bar(stats: TokenStatistics, tau: Tensor) -> Tensor:
    """``tau * denom``: phi >= tau  <=>  d^2 >= tau * denom, one comparison and no score tensor.

    Before a statistic has data (count < MIN_COUNT) nothing is monosemantic: its bar is +inf.
    """
    return torch.where(stats.seen, tau, torch.inf) * stats.denom


def _token_count(valid: Tensor | None, rows: Tensor) -> Tensor:
    """The micro-batch's (unpadded) token rows of ``rows`` ``[tokens, N]``: 0-dim fp32."""
    return valid.sum() if valid is not None else rows.new_full((), float(rows.shape[0]), dtype=torch.float32)


def _penalty_scale(coef: float, tokens: Tensor, active: Tensor, loss_scale: Tensor | None) -> Tensor:
    """The factor of ``d / (d^2 + log_eps)`` in the outgoing gradient (0 where not ``active``)."""
    scale = torch.where(active, 2.0 * coef / tokens.clamp_min(1.0), 0.0)  # 2: d/dz log d^2 = 2/d
    if loss_scale is not None:  # `grad` carries GradScaler's scale S; unscale_ divides by S
        scale = scale * loss_scale
    return scale
