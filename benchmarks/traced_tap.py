"""The tap as ``torch.compile`` traces it: its traced form against its eager form, on CPU.

    python -m benchmarks.traced_tap [--smoke] [--tokens T] [--neurons N] [--rounds R]

Three compiled functions of one ``[tokens, N]`` fp32 pre-activation ``x`` (default ``[512,
2048]``: one Pythia-70M site at 4 x 128 tokens), each run forward and backward per round, paired
and interleaved: GELU alone (the baseline: the work the tap is fused into), GELU followed by the
library's tap (``_Tap``; Dynamo inlines it, Inductor fuses it with GELU) in its traced form
(the sums in the forward, where they fuse into the kernel that produces z; in the backward only
the penalty, the selection as an fp32 factor: ``tap._traced_penalty``), and the same tap with
its eager form traced instead (everything in the backward, a bool selection applied by
``masked_fill``: what the library traced first; ``tap._traced`` patched to False while that
function runs). Correctness first:
both give the same outgoing gradient and the same step sums, and the penalty is live.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._dynamo.testing import AotEagerAndRecordGraphs

from l2e_optim._src import tap
from l2e_optim._src.accumulator import accumulator_size
from l2e_optim._src.tap import _Tap
from l2e_optim._src.tap_site import TapSite

from . import _common

EPS, LOG_EPS, COEF, TAU = 0.01, 1e-6, 1e-3, 5.0


def _tapped(acc: Tensor, n: int) -> Callable[[Tensor], Tensor]:
    """GELU, then the library's tap (statistics present, penalty live), adding into ``acc``."""
    site = TapSite(torch.zeros(n), torch.ones(n), torch.tensor(TAU), torch.tensor(100), torch.tensor(50), acc,
                   torch.zeros_like(acc))
    options = (EPS, LOG_EPS, COEF, 0, "threshold", 0.02, 1)
    return lambda x: _Tap.apply(F.gelu(x), None, site, options, None, None)  # type: ignore[no-untyped-call]


def functions(n: int) -> tuple[dict[str, Callable[[Tensor], Tensor]], dict[str, Tensor]]:
    """The three compiled functions, and the step accumulator each tap adds into."""
    accs = {"traced_form": torch.zeros(accumulator_size(n)), "eager_form": torch.zeros(accumulator_size(n))}

    def gelu(x: Tensor) -> Tensor:
        return F.gelu(x)

    compiled: dict[str, Callable[[Tensor], Tensor]] = {"gelu": torch.compile(gelu, fullgraph=True)}
    compiled["traced_form"] = torch.compile(_tapped(accs["traced_form"], n), fullgraph=True)
    eager_form = torch.compile(_tapped(accs["eager_form"], n), fullgraph=True)

    def with_eager_form(x: Tensor) -> Tensor:
        with mock.patch.object(tap, "_traced", lambda: False):  # held on every call: guards match
            return eager_form(x)

    compiled["eager_form"] = with_eager_form
    return compiled, accs


def form_ops(n: int) -> dict[str, bool]:
    """Whether each tap's traced backward graph applies a bool mask (``masked_fill``): the check
    that patching ``tap._traced`` really traced the other form."""
    uses_mask = {}
    for name, traced in (("traced_form", True), ("eager_form", False)):
        torch._dynamo.reset()
        backend = AotEagerAndRecordGraphs()
        x = torch.randn(4, n).requires_grad_()
        with mock.patch.object(tap, "_traced", lambda traced=traced: traced):
            torch.autograd.backward(torch.compile(_tapped(torch.zeros(accumulator_size(n)), n), backend=backend, fullgraph=True)(x).sum())
        uses_mask[name] = any("masked_fill" in str(node.target) for g in backend.bw_graphs for node in g.graph.nodes)
    torch._dynamo.reset()
    return uses_mask


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.tokens, args.neurons, generator=g) * 3
    grad = torch.randn(args.tokens, args.neurons, generator=g) * 1e-2
    compiled, accs = functions(args.neurons)

    def backward_of(name: str) -> Callable[[], Tensor]:
        def call() -> Tensor:
            x = x0.clone().requires_grad_()
            torch.autograd.backward(compiled[name](x), grad)
            assert x.grad is not None
            return x.grad
        return call

    calls = {name: backward_of(name) for name in compiled}
    plain, ours, theirs = calls["gelu"](), calls["traced_form"](), calls["eager_form"]()
    assert float((ours - plain).abs().max()) > 1e-7, "the penalty is not live: nothing would be timed"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(accs["traced_form"], accs["eager_form"], rtol=1e-5, atol=1e-3)
    assert float(accs["traced_form"][-2]) > 0, "nothing selected"
    assert form_ops(args.neurons) == {"traced_form": False, "eager_form": True}, "the forms did not differ"
    _, cpu = _common.paired_times(calls, rounds=args.rounds, warmup=2)
    base = _common.median(cpu["gelu"])
    rows = [[name, _common.median(cpu[name]) * 1e3, (_common.median(cpu[name]) - base) * 1e3,
             _common.paired_ratio(cpu[name], cpu["gelu"])] for name in calls]
    print(f"traced_tap: [{args.tokens}, {args.neurons}] fp32, {args.rounds} rounds, inductor, "
          f"loadavg={_common.machine()['loadavg']}")
    print(_common.table(["compiled fwd+bwd", "median CPU ms", "tap's share ms", "ratio to GELU"], rows))
    return {"tokens": args.tokens, "neurons": args.neurons, "rounds": args.rounds, "smoke": args.smoke,
            "ms": {row[0]: row[1] for row in rows}, "ratio_to_gelu": {row[0]: row[3] for row in rows},
            "checks": {"taps_agree": True, "penalty_live": True, "forms_differ": True}}


OPTIONS: dict[str, _common.Default] = {"tokens": (64, 512), "neurons": (128, 2048), "rounds": (3, 40)}


def main(argv: list[str] | None = None) -> None:
    _common.main("traced_tap", __doc__, run, argv, OPTIONS, smoke_help="a small activation (for CI)")


if __name__ == "__main__":
    main()
