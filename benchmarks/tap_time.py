"""CPU time of one site's tap backward: eager, the blocked path and the C tap, paired.

    python -m benchmarks.tap_time [--smoke] [--tokens T] [--neurons N] [--rounds R]

One ``[tokens, N]`` fp32 activation (default ``[512, 2048]``: one Pythia-70M site at 4 x 128
tokens) with statistics present and a live L2E gradient; each round runs every implementation's
backward once, in rotating order; a ratio is the median of the per-round ratios. The C tap is
timed when it builds here (a C compiler; ``native: null`` otherwise). Correctness first: the L2E
gradient is live, each fused gradient equals the eager one to fp32 rounding (they round once),
and the sums agree to fp32 rounding. The activation and gradient stay in the cache between
rounds, so these are the taps' costs warm; inside a training step they arrive colder.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from l2e_optim._src.kernels import native_tap
from l2e_optim._src.kernels.blocked_tap import BlockedTap
from l2e_optim._src.tap import _Tap
from l2e_optim._src.tap_site import TapSite

from . import _common


def backward_of(fused: BlockedTap | None, tokens: int, neurons: int) -> tuple[Callable[[], Any], torch.Tensor]:
    """A call that runs the tap's backward once; and the step accumulator it adds into."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(tokens, neurons, generator=g) * 2).requires_grad_()
    grad = incoming(tokens, neurons)
    site = TapSite.pooled(torch.zeros(neurons), torch.ones(neurons), torch.tensor(5.0), torch.tensor(100),
                          torch.tensor(50))
    acc = site.accumulator
    options = (0.01, 1e-6, 1e-3, 10, "threshold", 0.02, 1)

    def run() -> torch.Tensor:
        out = _Tap.apply(z, None, site, options, None, fused)  # type: ignore[no-untyped-call]
        return torch.autograd.grad(out, z, grad)[0]

    return run, acc


def incoming(tokens: int, neurons: int) -> torch.Tensor:
    """The gradient flowing into the tap (the same every call)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(tokens, neurons, generator=g) * 1e-2


def run(args: argparse.Namespace) -> dict[str, Any]:
    taps: dict[str, BlockedTap | None] = {"eager": None, "blocked": BlockedTap()}
    if native_tap.available():
        taps["native"] = native_tap.NativeTap()
    calls, accs = {}, {}
    for name, fused in taps.items():
        calls[name], accs[name] = backward_of(fused, args.tokens, args.neurons)
    want = calls["eager"]()
    penalty = (want - incoming(args.tokens, args.neurons)).abs().max()
    assert penalty > 1e-7, "the L2E gradient is not live: nothing would be timed"
    for name in taps.keys() - {"eager"}:
        # Rounded once in fp32 (eager rounds d / (d^2 + delta) first): equal to fp32 rounding.
        torch.testing.assert_close(calls[name](), want, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(accs[name], accs["eager"], rtol=1e-5, atol=1e-3)
    _, cpu = _common.paired_times(calls, rounds=args.rounds, warmup=2)
    ms = {name: _common.median(cpu[name]) * 1e3 for name in taps}
    ratios = {name: _common.paired_ratio(cpu[name], cpu["eager"]) for name in taps}
    print(f"tap_time: [{args.tokens}, {args.neurons}] fp32, {args.rounds} rounds, "
          f"loadavg={_common.machine()['loadavg']}; C tap {'built' if 'native' in taps else 'unavailable'}")
    print(_common.table(["tap", "median CPU ms", "ratio to eager"], [[n, ms[n], ratios[n]] for n in taps]))
    return {"tokens": args.tokens, "neurons": args.neurons, "rounds": args.rounds, "smoke": args.smoke,
            "eager_ms": ms["eager"], "blocked_ms": ms["blocked"], "native_ms": ms.get("native"),
            "blocked_over_eager": ratios["blocked"], "native_over_eager": ratios.get("native"),
            "checks": {"gradient_close": True, "penalty_live": True, "sums_close": True}}


OPTIONS: dict[str, _common.Default] = {"tokens": (64, 512), "neurons": (256, 2048), "rounds": (3, 40)}


def main(argv: list[str] | None = None) -> None:
    _common.main("tap_time", __doc__, run, argv, OPTIONS, smoke_help="a small activation (for CI)")


if __name__ == "__main__":
    main()
