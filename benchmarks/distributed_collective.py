"""Cost of L2E's one all-reduce per step under DDP: bytes, time, and share of the step.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.distributed_collective \\
        [--smoke] [--shape tiny|pythia-70m] [--layers mid-2|all] [--rounds R] [--batch B] [--seq S]

Two arms, each with its own DDP copy of the same model, stepped alternately round by round on
the same per-rank batches (rank r takes its own rows): plain AdamW (the baseline) and AdamW
wrapped in L2EWrapper. Reported per step: the bytes of the L2E collective (every site's step
accumulator, fp32, in one buffer), the host time spent launching it and waiting for it inside
``step()`` (what the step actually pays, after overlap with the base optimizer's step), the time
of the same all-reduce issued alone and blocking (what it would cost without overlap), and both
as a share of the L2E arm's step time. Correctness, asserted before any number is printed: one
``dist.all_reduce`` per step carrying exactly the accumulators, and the L2E state and the
parameters bit-identical on every rank.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from l2e_optim import L2EConfig, L2EWrapper
from l2e_optim._lab.zoo import MODEL_SHAPES, PlainLM, build_model, lm_loss
from l2e_optim._src import wrapper as _wrapper_module
from l2e_optim._src.distributed import start_all_reduce

from . import _common


class CollectiveClock:
    """Times the wrapper's all-reduce: host seconds to launch it plus seconds waiting for it.

    Instruments the private ``start_all_reduce`` the wrapper calls (measurement only; the
    reduction itself is the library's own code).
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.calls: list[int] = []  # numel of every dist.all_reduce issued, by anyone

    @contextmanager
    def installed(self) -> Iterator[None]:
        original_reduce = dist.all_reduce

        def timed_start(accumulators: Any, group: Any) -> Any:
            start = time.perf_counter()
            pending = start_all_reduce(accumulators, group)
            launched = time.perf_counter() - start
            if pending is None:
                return None
            wait = pending.wait

            def timed_wait() -> None:
                begin = time.perf_counter()
                wait()
                self.seconds.append(launched + time.perf_counter() - begin)

            pending.wait = timed_wait  # type: ignore[method-assign]
            return pending

        def counted_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(tensor.numel())
            return original_reduce(tensor, *args, **kwargs)

        # The wrapper looks start_all_reduce up in its own module's namespace: patch it there.
        with mock.patch.object(_wrapper_module, "start_all_reduce", timed_start), \
                mock.patch.object(dist, "all_reduce", counted_reduce):
            yield


def make_model(args: argparse.Namespace) -> nn.Module:
    if args.smoke:
        return PlainLM(width=32, layers=4)  # no transformers import: seconds of CI saved
    return build_model(args.shape)


def make_step(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]
) -> Callable[[], None]:
    position = [0]

    def run() -> None:
        ids = batches[position[0] % len(batches)]
        position[0] += 1
        torch.autograd.backward(lm_loss(model, ids))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def blocking_all_reduce_seconds(numel: int, reps: int) -> float:
    """Median seconds of one blocking all-reduce of ``numel`` fp32 values, ranks aligned first."""
    buffer = torch.zeros(numel)
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - start)
    return _common.median(times)


def identical_on_all_ranks(tensors: list[torch.Tensor]) -> bool:
    """Whether the concatenation of ``tensors`` is bit-identical on every rank."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


#: --batch is sequences per rank.
OPTIONS: dict[str, _common.Default] = {"rounds": (4, 20), "batch": (2, 4), "seq": (16, 128)}


def _choices(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(MODEL_SHAPES), default="tiny")
    parser.add_argument("--layers", choices=["mid-2", "all"], default="all")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _common.parse_args(__doc__, argv, OPTIONS, smoke_help="tiny torch-only model, few rounds (CI)",
                              extra=_choices)
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # torchrun's environment; CPU collectives
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = _common.byte_batches(args.batch * world, args.seq + 1, args.rounds + 2, seed=0)
    local = [b.chunk(world)[rank] for b in batches]  # each rank its own rows
    base_model, l2e_model = DDP(make_model(args)), DDP(make_model(args))
    config = L2EConfig(layers=args.layers, warmup_steps=0)
    base_opt = torch.optim.AdamW(base_model.parameters(), lr=1e-3)
    l2e_opt = L2EWrapper(torch.optim.AdamW(l2e_model.parameters(), lr=1e-3), l2e_model, config=config)
    numel = sum(site.accumulator.numel() for site in l2e_opt.sites.values())
    clock = CollectiveClock()
    arms = {"adamw": make_step(base_model, base_opt, local), "l2e": make_step(l2e_model, l2e_opt, local)}
    with clock.installed():
        wall, cpu = _common.paired_times(arms, rounds=args.rounds, warmup=2)
    steps = args.rounds + 2
    # Correctness before any number: one collective per step carrying exactly the accumulators,
    # and every rank holds the same L2E state and parameters.
    state = [t for site in l2e_opt.sites.values() for t in site.tensors().values()]
    checks = {
        "one_all_reduce_per_step_of_the_accumulators": clock.calls == [numel] * steps,
        "l2e_state_identical_across_ranks": identical_on_all_ranks(state),
        "params_identical_across_ranks": identical_on_all_ranks(list(l2e_model.parameters())),
        "statistics_gathered": all(float(s.count) > 0 for s in l2e_opt.sites.values()),
    }
    assert all(checks.values()), f"{checks}; all_reduce sizes {clock.calls}, expected {steps} x {numel}"
    blocking = blocking_all_reduce_seconds(numel, reps=max(args.rounds, 10))
    step_l2e, step_base = _common.median(wall["l2e"]), _common.median(wall["adamw"])
    exposed = _common.median(clock.seconds[2:])  # the warm-up steps' collectives left out
    result = {
        "smoke": args.smoke,
        "world_size": world,
        "backend": dist.get_backend(),
        "model": "plain-smoke" if args.smoke else args.shape,
        "layers": args.layers,
        "sites": len(l2e_opt.sites),
        "tokens_per_rank_per_step": args.batch * args.seq,
        "rounds": args.rounds,
        "collective_calls_per_step": len(clock.calls) / steps,
        "collective_bytes_per_step": numel * 4,
        "collective_exposed_s": exposed,
        "collective_blocking_s": blocking,
        "step_s_adamw": step_base,
        "step_s_l2e": step_l2e,
        "step_ratio_l2e_vs_adamw": _common.paired_ratio(wall["l2e"], wall["adamw"]),
        "cpu_ratio_l2e_vs_adamw": _common.paired_ratio(cpu["l2e"], cpu["adamw"]),
        "collective_exposed_share": exposed / step_l2e,
        "collective_blocking_share": blocking / step_l2e,
        "checks": checks,
    }
    if rank == 0:
        print(_common.table(
            ["quantity", "value"],
            [
                ["ranks (gloo, CPU)", world],
                ["sites / layers", f"{len(l2e_opt.sites)} / {args.layers}"],
                ["L2E all_reduce calls per step", result["collective_calls_per_step"]],
                ["L2E bytes per step", result["collective_bytes_per_step"]],
                ["exposed time in step() (s)", exposed],
                ["blocking all_reduce alone (s)", blocking],
                ["step time AdamW / L2E (s)", f"{step_base:.4f} / {step_l2e:.4f}"],
                ["paired step ratio L2E/AdamW", result["step_ratio_l2e_vs_adamw"]],
                ["exposed share of L2E step", result["collective_exposed_share"]],
                ["blocking share of L2E step", result["collective_blocking_share"]],
            ],
        ))
        _common.emit("distributed_collective", result)
    return result


if __name__ == "__main__":
    try:
        main()
        if dist.is_initialized():
            # Every rank done before any tears gloo down: without it a rank that exits while its
            # peer still prints could abort at exit ("terminate called without an active
            # exception", SIGABRT: seen in about one run in ten). Monitored: a rank that failed
            # is reported within a minute instead of holding this one for gloo's 30.
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
