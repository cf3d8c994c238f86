"""Bytes moved per activation value by the tap's backward, eager vs fused, and their H100 roofline.

    python -m benchmarks.tap_bytes [--smoke] [--tokens T] [--neurons N]

Eager (and blocked): counted. :class:`ByteCounter`, a ``TorchDispatchMode``, adds up the bytes
of every tensor each aten op reads (its tensor arguments, except an ``out=`` one) and writes
(its results) while the tap's backward runs on a ``[tokens, N]`` activation, after warm-up,
statistics present, a live L2E gradient; divided by tokens x N. That is the memory traffic of
unfused kernels on a GPU, where each op streams its operands from and to HBM. (On a CPU the
blocked path's buffers stay in cache, so its DRAM traffic is lower than its count.)

Fused (Triton): counted from the kernel's loads and stores: ``z`` and the incoming gradient
read once, the outgoing gradient written once, plus per program the ``mean`` / ``bar`` stripe,
the padding weights and one row of fp32 partial sums, and the O(N) torch reductions after it.

Roofline: an H100 SXM streams 3.35 TB/s from HBM; the tap's time per token is its bytes per
value x N x hooked layers / 3.35 TB/s. The step it is compared with is the model's training
FLOPs per token (6 x parameters + 12 x layers x hidden x sequence, for attention) at 989 dense
bf16 TFLOP/s and 40% model-FLOPs utilisation. A real step of a small model is slower than that
(it is bandwidth-bound too), so the overhead fractions printed are upper bounds.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from l2e_optim._src.kernels.blocked_tap import BlockedTap
from l2e_optim._src.tap import _Tap
from l2e_optim._src.tap_site import TapSite

from . import _common

HBM_BYTES_PER_S = 3.35e12
PEAK_FLOPS, MFU = 989e12, 0.40
#: Pythia shapes: (parameters, layers, hidden, MLP neurons N), sequence 2048.
PYTHIA = {"70m": (70.4e6, 6, 512, 2048), "410m": (405.3e6, 24, 1024, 4096), "2.8b": (2.78e9, 32, 2560, 10240)}
SEQ = 2048
_NO_TRAFFIC = frozenset({"empty", "new_empty", "empty_like", "empty_strided", "detach"})
_WRITE_ONLY = frozenset({"new_full", "new_zeros", "new_ones", "zeros_like", "ones_like", "full_like"})


class ByteCounter(TorchDispatchMode):
    """Counts bytes read and written by every aten op run under it, by op name (views move none)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.by_op: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        written = kwargs.get("out")
        reads = [t for t in tree_flatten((args, {k: v for k, v in kwargs.items() if k != "out"}))[0]
                 if isinstance(t, Tensor)]
        result = func(*args, **kwargs)
        if func.is_view or func.overloadpacket.__name__ in _NO_TRAFFIC:
            return result  # a view or an uninitialised allocation moves no data
        if func.overloadpacket.__name__ in _WRITE_ONLY:
            reads = []  # ``x.new_full(...)``, ``zeros_like(x)``: x gives only a dtype and device
        writes = [t for t in tree_flatten(result)[0] if isinstance(t, Tensor)]
        if written is not None and not writes:
            writes = [t for t in tree_flatten(written)[0] if isinstance(t, Tensor)]
        self.by_op[str(func.overloadpacket.__name__)] += sum(_bytes(t) for t in reads + writes)
        return result


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def counted_bytes(kernel: str, tokens: int, neurons: int, dtype: torch.dtype) -> tuple[int, Counter[str]]:
    """Bytes the tap's backward moves (``kernel``: "eager" or "blocked"), counted op by op."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(tokens, neurons, generator=g) * 2).to(dtype).requires_grad_()
    grad = (torch.randn(tokens, neurons, generator=g) * 1e-2).to(dtype)
    site = TapSite.pooled(torch.zeros(neurons), torch.ones(neurons), torch.tensor(5.0), torch.tensor(100),
                          torch.tensor(50))
    options = (0.01, 1e-6, 1e-3, 10, "threshold", 0.02, 1)
    fused = BlockedTap() if kernel == "blocked" else None
    for _ in range(2):  # warm-up (the blocked buffers are allocated once)
        torch.autograd.grad(_Tap.apply(z, None, site, options, None, fused), z, grad)  # type: ignore[no-untyped-call]
    out = _Tap.apply(z, None, site, options, None, fused)  # type: ignore[no-untyped-call]
    with ByteCounter() as counter:
        torch.autograd.grad(out, z, grad)
    return counter.total, counter.by_op


def triton_bytes(tokens: int, neurons: int, dtype: torch.dtype) -> float:
    """Bytes of the Triton tap's backward, from the kernel's loads and stores (no padding mask)."""
    from l2e_optim._src.kernels.triton_tap import BLOCK_N, rows_per_program  # imports triton

    size = torch.tensor([], dtype=dtype).element_size()
    rows = rows_per_program(tokens, neurons)
    programs_t = -(-tokens // rows)
    stripes = -(-neurons // BLOCK_N)
    stream = tokens * neurons * 3 * size  # z and grad read, the outgoing grad written
    per_program = programs_t * neurons * (2 * 4 + 3 * 4)  # mean and bar read, 3 partial rows written
    scalars = programs_t * stripes * 4 + -(-tokens * neurons // 1024) * 4  # scale; the finite flag
    after = programs_t * 3 * neurons * 4 + 3 * neurons * 4 + 12 * neurons * 4  # sum, finite, counts, acc
    return float(stream + per_program + scalars + after)


def roofline(bytes_per_value: float) -> dict[str, dict[str, float]]:
    """Tap seconds per token (all layers hooked) against the step's, at each Pythia width."""
    out = {}
    for name, (params, layers, hidden, neurons) in PYTHIA.items():
        step_s = (6 * params + 12 * layers * hidden * SEQ) / (PEAK_FLOPS * MFU)
        tap_s = bytes_per_value * neurons * layers / HBM_BYTES_PER_S
        out[name] = {"step_ns_per_token": step_s * 1e9, "tap_ns_per_token_all": tap_s * 1e9,
                     "overhead_all": tap_s / step_s, "overhead_mid2": tap_s * 2 / layers / step_s}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows, results = [], {}
    values = args.tokens * args.neurons
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        eager, by_op = counted_bytes("eager", args.tokens, args.neurons, dtype)
        blocked, _ = counted_bytes("blocked", args.tokens, args.neurons, dtype)
        fused = triton_bytes(args.tokens, args.neurons, dtype)
        per = {"eager": eager / values, "blocked": blocked / values, "triton": fused / values}
        results[name] = {"bytes_per_value": per, "eager_by_op": {k: v / values for k, v in by_op.most_common()},
                         "roofline_h100": {k: roofline(v) for k, v in per.items()}}
        for kernel, b in per.items():
            line = results[name]["roofline_h100"][kernel]
            rows.append([name, kernel, b, *(line[w]["overhead_all"] for w in PYTHIA),
                         *(line[w]["overhead_mid2"] for w in PYTHIA)])
    print(f"tap_bytes: [{args.tokens}, {args.neurons}] activation; H100 {HBM_BYTES_PER_S / 1e12} TB/s, "
          f"step at {PEAK_FLOPS / 1e12:.0f} TFLOP/s x {MFU:.0%} MFU, seq {SEQ}")
    print(_common.table(["dtype", "tap", "bytes/value", *(f"all {w}" for w in PYTHIA),
                         *(f"mid-2 {w}" for w in PYTHIA)], rows))
    assert results["bfloat16"]["bytes_per_value"]["triton"] < results["bfloat16"]["bytes_per_value"]["eager"]
    return {"tokens": args.tokens, "neurons": args.neurons, "smoke": args.smoke, "dtypes": results,
            "checks": {"fused_moves_less": True}}


OPTIONS: dict[str, _common.Default] = {"tokens": (64, 4096), "neurons": (256, 2048)}


def main(argv: list[str] | None = None) -> None:
    _common.main("tap_bytes", __doc__, run, argv, OPTIONS, smoke_help="a small activation (for CI)")


if __name__ == "__main__":
    main()
