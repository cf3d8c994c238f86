"""Where the L2E wrapper's cost goes when the model is compiled, kernel by kernel (CPU).

    python -m benchmarks.compiled_breakdown [--smoke] [--rounds R] [--steps S] [--batch B] [--seq S]

``step_overhead --compile`` gives one ratio, which on this machine scatters by about a point and a
half from run to run; this benchmark says what the compiled L2E work costs, part by part. One
model (byte-vocabulary Pythia-70M widths; ``--smoke``: the tiny one) is compiled once and trained
by one AdamW, alternately plain (the L2E wrapper paused, so its hooks add nothing to the graph)
and through the wrapper (every layer hooked); each round profiles ``--steps`` steps of each with
``torch.profiler`` and Inductor's per-kernel profiling. The two arms share weights, optimizer
state and memory, so what differs is the wrapper's work. Per step, median over rounds, of CPU time:

- *compiled kernels*: Inductor's kernels; the L2E graph fuses the tap into the kernels around the
  activation (the GELU's forward and backward), so this is where the tap's own work lands. Also
  reported: the kernels that only one graph has (renamed by what the tap fused into them);
  their difference is indicative only, since a kernel can move work to one both graphs have
  (the L2E graph computes the up projection's bias gradient in a kernel of its own, the plain
  graph inside its GELU-backward kernel);
- *matmuls / attention*: ``mm``, ``addmm``, ``bmm`` and the attention ops (should not move);
- *graph calls*: Dynamo's guard check and the compiled graphs' Python calls (more inputs: the
  sites' tensors);
- *optimizer step*: ``opt.step()`` as a whole (the wrapper's: AdamW plus the commit);
- *other*: the rest of the profiled time.

Also counted: minor page faults per step. glibc returns freed memory to the system and maps it
again, and the first write to each fresh page faults; the graphs' different buffers can change
how often that happens, and the time lands in whichever op first writes the memory (a matmul's
output, say), not in the tap.

Checks: the L2E graph has kernels the plain one lacks (the hooks were compiled in: Dynamo guards
on module hooks only when told to, so a hook-less graph could otherwise be reused), every site
selected something and merged exactly the tokens of the wrapper's own steps.
"""

from __future__ import annotations

import argparse
import collections
import re
import resource
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.profiler import profile

from l2e_optim import L2EConfig, L2EWrapper
from l2e_optim._lab.zoo import build_model, lm_loss

from . import _common, step_overhead

CATEGORIES = ["compiled kernels", "matmuls / attention", "graph calls", "optimizer step", "other"]
_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product")
_GRAPH_CALLS = ("## Call CompiledFxGraph", "TorchDynamo Cache Lookup", "CompiledFunction", "Torch-Compiled Region",
                "AOTDispatcher", "Pregraph bytecode")
_STEP = "Optimizer.step#"
ONLY_ONE = "  of which kernels only this graph has"


class Profiled(NamedTuple):
    """One arm's profiled steps, per step."""

    selfs: dict[str, float]  #: self CPU ms of each event name
    step_ms: float  #: ms inside ``opt.step()`` (its outermost profiler range, children included)
    step_self: float  #: the part of ``selfs`` that is ``opt.step()``'s own ranges
    faults: float  #: minor page faults (first touches of memory the allocator got fresh)


def profiled_steps(step: Callable[[], None], steps: int) -> Profiled:
    """Profile ``steps`` calls of ``step``."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with profile() as prof:
        for _ in range(steps):
            step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    selfs: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        # Inductor names a kernel "graph_<graph id>_cpp_fused_<ops>_<index>": the same kernel in
        # the other graph differs by the graph id and, when the tap's kernels come before it, the
        # index; kernels of the same ops are summed.
        selfs[re.sub(r"^graph_\d+_(cpp_fused_.*)_\d+$", r"\1", event.key)] += event.self_cpu_time_total / 1e3 / steps
    outermost = [e for e in prof.events() if e.name.startswith(_STEP)
                 and not (e.cpu_parent is not None and e.cpu_parent.name.startswith(_STEP))]
    step_ms = sum(e.cpu_time_total for e in outermost) / 1e3 / steps
    step_self = sum(ms for name, ms in selfs.items() if name.startswith(_STEP))
    return Profiled(dict(selfs), step_ms, step_self, faults / steps)


def categorize(prof: Profiled, changed: set[str]) -> dict[str, float]:
    """Sort one arm's per-step times into CATEGORIES, plus "only this graph's kernels" (those
    in ``changed``, the kernel names only one arm has).

    Ops that ``opt.step()`` runs count in its inclusive time, the rest by their self time.
    """
    out = dict.fromkeys([*CATEGORIES, ONLY_ONE], 0.0)
    for name, ms in prof.selfs.items():
        if "cpp_fused" in name:
            out["compiled kernels"] += ms
            out[ONLY_ONE] += ms if name in changed else 0.0
        elif name.startswith(_MATMULS):
            out["matmuls / attention"] += ms
        elif name.startswith(_GRAPH_CALLS):
            out["graph calls"] += ms
    out["optimizer step"] = prof.step_ms
    out["other"] = sum(prof.selfs.values()) - prof.step_self - sum(out[c] for c in CATEGORIES[:3])
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = "tiny" if args.smoke else "pythia-70m"
    batches = _common.byte_batches(args.batch, args.seq + 1, count=8)
    torch.manual_seed(0)
    model = build_model(shape)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wrapper = L2EWrapper(base, model, config=L2EConfig(layers="all", warmup_steps=0))
    compiled: nn.Module = torch.compile(model)  # type: ignore[assignment]
    counter = [0]
    l2e_steps = [0]

    def step(opt: torch.optim.Optimizer) -> None:
        ids = batches[counter[0] % len(batches)]
        counter[0] += 1
        torch.autograd.backward(lm_loss(compiled, ids))
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain() -> None:
        with wrapper.paused():
            step(base)

    def l2e() -> None:
        l2e_steps[0] += 1
        step(wrapper)

    arms = {"adamw": plain, "l2e": l2e}
    per_round: dict[str, list[Profiled]] = {arm: [] for arm in arms}
    kernels: dict[str, set[str]] = {arm: set() for arm in arms}
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False), \
            torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        for fn in arms.values():  # compile and warm up both graphs
            for _ in range(2):
                fn()
        for r in range(args.rounds):
            for arm in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                prof = profiled_steps(arms[arm], args.steps)
                kernels[arm] |= {name for name in prof.selfs if "cpp_fused" in name}
                per_round[arm].append(prof)
    changed = kernels["adamw"] ^ kernels["l2e"]
    assert kernels["l2e"] - kernels["adamw"], "the L2E graph has no kernel of its own: the hooks were not compiled in"
    step_overhead.check_own_tokens("l2e", wrapper, l2e_steps[0], batches[0][:, :-1].numel())

    medians: dict[str, dict[str, float]] = {}
    for arm, rounds in per_round.items():
        cats = [categorize(prof, changed) for prof in rounds]
        medians[arm] = {c: _common.median([x[c] for x in cats]) for c in [*CATEGORIES, ONLY_ONE]}
        medians[arm]["total"] = _common.median([sum(x[c] for c in CATEGORIES) for x in cats])
    names = sorted(kernels["adamw"] | kernels["l2e"])
    per_kernel = {name: [_common.median([prof.selfs.get(name, 0.0) for prof in per_round[arm]]) for arm in arms]
                  for name in names}
    base_total = medians["adamw"]["total"]
    shown = [CATEGORIES[0], ONLY_ONE, *CATEGORIES[1:], "total"]
    diffs = {c: medians["l2e"][c] - medians["adamw"][c] for c in shown}
    rows = [[c, medians["adamw"][c], medians["l2e"][c], diffs[c], 100 * diffs[c] / base_total] for c in shown]
    print(f"compiled_breakdown: shape={shape} batch={args.batch} seq={args.seq} rounds={args.rounds} "
          f"steps={args.steps} threads={args.threads} sites={len(wrapper.sites)} "
          f"loadavg={_common.machine()['loadavg']}")
    faults = {arm: _common.median([prof.faults for prof in per_round[arm]]) for arm in arms}
    print("CPU ms per step under the profiler, median over rounds; % of the plain step's total")
    print(_common.table(["part", "AdamW ms", "L2E ms", "L2E - AdamW", "% of step"], rows))
    print(f"minor page faults per step (fresh memory touched, e.g. by a matmul's output): "
          f"AdamW {faults['adamw']:.0f}, L2E {faults['l2e']:.0f}")
    return {
        "shape": shape, "batch": args.batch, "seq": args.seq, "rounds": args.rounds, "steps": args.steps,
        "smoke": args.smoke, "sites": len(wrapper.sites), "ms_per_step": medians,
        "minor_faults_per_step": faults,
        "kernels_ms": per_kernel,  # name: [AdamW, L2E] ms per step (0: the graph lacks it)
        "checks": {"hooks_compiled": True, "sites_select": True, "own_tokens_only": True},
    }


OPTIONS: dict[str, _common.Default] = {"rounds": (2, 8), "steps": (1, 3), "batch": 4, "seq": (32, 128)}


def main(argv: list[str] | None = None) -> None:
    _common.main("compiled_breakdown", __doc__, run, argv, OPTIONS)


if __name__ == "__main__":
    main()
