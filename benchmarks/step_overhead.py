"""End-to-end train-step time of L2E and MEmeL against plain AdamW, on the Pythia-70M shape.

    python -m benchmarks.step_overhead [--smoke] [--rounds R] [--batch B] [--seq S] [--threads T]
                                       [--compile]

Every arm (AdamW; L2E and MEmeL with the "mid-2" and "all" sites, with the default tap kernel
("auto": on CPU the C tap when a C compiler is present, else the blocked tap), L2E "all" with
the blocked and the eager tap for comparison, and L2E and
MEmeL "mid-2" with per-position statistics, one row per position, whose tap runs eager) owns a
copy of the same initial model and sees the same batches in the same order; the arms' steps are
interleaved round by round and the slowdown is the median of the per-round ratios to AdamW.
``--compile`` adds a second, separately paired set: ``torch.compile(model)`` for AdamW and L2E
(the tap's eager math is then traced and fused by inductor). Time inside
``step()`` (the base step plus the commit) is measured separately; the rest of the difference
is the backward tap (statistics, scores, selection, L2E gradient) and, for MEmeL, the forward
rewrite. Correctness, asserted before any number is printed: with ``strength=0`` the L2E run's
parameters equal AdamW's bit for bit; with the default strength they differ (the regularizer
is live) and the sites select values.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from l2e_optim import L2EConfig, L2EWrapper
from l2e_optim._src.kernels import native_tap
from l2e_optim._src.kernels.dispatch import pick_kernel
from l2e_optim._lab.zoo import build_model, lm_loss

from . import _common

#: Targets from the issues: L2E at most 1.01x AdamW with "mid-2" sites, 1.03x with "all"; with
#: the model compiled, 1.01x.
TARGETS = {"l2e/mid-2": 1.01, "l2e/all": 1.03, "compiled/l2e/all": 1.01}
ARMS = ["adamw", "l2e/mid-2", "l2e/all", "l2e/all/blocked", "l2e/all/eager", "memel/mid-2", "memel/all",
        "l2e/mid-2/per-position", "memel/mid-2/per-position"]
COMPILED_ARMS = ["compiled/adamw", "compiled/l2e/mid-2", "compiled/l2e/all"]
LR = 1e-3


def make_optimizer(model: nn.Module, arm: str, seq: int) -> torch.optim.Optimizer:
    """AdamW, or AdamW wrapped for ``arm`` = "[compiled/]<l2e|memel>/<layers>[/<option>]", the
    option a tap kernel ("blocked", "eager") or "per-position" statistics (one row per position of ``seq``)."""
    base = torch.optim.AdamW(model.parameters(), lr=LR)
    config = arm_config(arm, seq)
    return base if config is None else L2EWrapper(base, model, config=config)


def arm_config(arm: str, seq: int) -> L2EConfig | None:
    """The wrapper's config of ``arm`` (see :func:`make_optimizer`); None for plain AdamW."""
    parts = arm.removeprefix("compiled/").split("/")
    if parts == ["adamw"]:
        return None
    method, layers, *options = parts
    kernel: Any = next((o for o in options if o != "per-position"), "auto")
    return L2EConfig(inhibition=method, layers=layers, warmup_steps=0,  # type: ignore[arg-type]
                     statistics="per-position" if "per-position" in options else "pooled",
                     max_positions=seq, kernel=kernel)


def make_step(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor], step_times: list[float]
) -> Callable[[], float]:
    """One training step per call, on the next batch; records the CPU time inside ``opt.step()``."""
    counter = [0]

    def run() -> float:
        ids = batches[counter[0] % len(batches)]
        counter[0] += 1
        loss = lm_loss(model, ids)
        torch.autograd.backward(loss)
        start = time.process_time()
        opt.step()
        step_times.append(time.process_time() - start)
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def check_reduces_to_adamw(shape: str, batches: list[torch.Tensor]) -> None:
    """With strength 0 the wrapped AdamW must train exactly like AdamW (bit-identical)."""
    plain = build_model(shape)
    wrapped = copy.deepcopy(plain)
    opt_a = torch.optim.AdamW(plain.parameters(), lr=LR)
    opt_b = L2EWrapper(
        torch.optim.AdamW(wrapped.parameters(), lr=LR),
        wrapped,
        config=L2EConfig(strength=0.0, layers="all", warmup_steps=0),
    )
    for ids in batches[:3]:
        for model, opt in ((plain, opt_a), (wrapped, opt_b)):
            torch.autograd.backward(lm_loss(model, ids))
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        assert torch.equal(a, b), f"strength=0 changed parameter {name}: L2E must reduce to AdamW"


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = "tiny" if args.smoke else "pythia-70m"
    batches = _common.byte_batches(args.batch, args.seq + 1, count=8)
    check_reduces_to_adamw(shape, batches)

    base_model: nn.Module = build_model(shape)
    how = measure_shared if args.shared else measure
    chosen = ARMS if args.arms is None else _chosen_arms(args.arms)
    rows, arms_out = how(chosen, base_model, batches, args.rounds, args.seq)
    if args.compile:
        more_rows, more_arms = how(COMPILED_ARMS, base_model, batches, args.rounds, args.seq)
        rows, arms_out = rows + more_rows, {**arms_out, **more_arms}
    print(f"step_overhead: shape={shape} batch={args.batch} seq={args.seq} rounds={args.rounds} "
          f"threads={args.threads} design={'shared' if args.shared else 'copies'} "
          f"loadavg={_common.machine()['loadavg']}")
    print("ratio = median over rounds of (arm CPU time / AdamW CPU time), paired; wall ratio likewise;")
    print("compiled arms are paired with the compiled AdamW")
    print(_common.table(
        ["arm", "median CPU s", "ratio/AdamW", "wall ratio", "step() CPU s", "step() ratio",
         "target", "status"], rows))
    return {
        "shape": shape, "batch": args.batch, "seq": args.seq, "rounds": args.rounds,
        "smoke": args.smoke, "design": "shared" if args.shared else "copies", "arms": arms_out,
        "checks": {"strength0_bit_identical": True, "regularizer_changes_params": True,
                   "sites_select": True},
    }


def measure(
    arm_names: list[str], base_model: nn.Module, batches: list[torch.Tensor], rounds: int, seq: int
) -> tuple[list[list[Any]], dict[str, Any]]:
    """Time ``arm_names`` paired and interleaved; the first arm is the baseline."""
    models = {arm: copy.deepcopy(base_model) for arm in arm_names}
    opts = {arm: make_optimizer(models[arm], arm, seq) for arm in arm_names}
    runners: dict[str, nn.Module] = {
        arm: cast(nn.Module, torch.compile(model)) if arm.startswith("compiled/") else model
        for arm, model in models.items()
    }
    step_times: dict[str, list[float]] = {arm: [] for arm in arm_names}
    arms = {arm: make_step(runners[arm], opts[arm], batches, step_times[arm]) for arm in arm_names}
    # Dynamo does not guard on module hooks by default: the compiled AdamW copy's hook-less graph
    # would be reused for the hooked copies (same class, same code) and L2E would silently do
    # nothing there (measured: no site selected anything). Guarding on hooks compiles each arm.
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        wall, cpu = _common.paired_times(arms, rounds=rounds, warmup=2)

    _check_inhibition_live(models, opts, arm_names[0])
    return _report(arm_names, opts, wall, cpu, step_times)


def measure_shared(
    arm_names: list[str], base_model: nn.Module, batches: list[torch.Tensor], rounds: int, seq: int
) -> tuple[list[list[Any]], dict[str, Any]]:
    """Like :func:`measure`, but every arm steps one model and one AdamW (``--shared``).

    Each L2E/MEmeL arm is a wrapper around that AdamW, paused while another arm steps (a paused
    wrapper's hooks return at once and gather nothing): the arms differ only by the wrapper's
    work, not by where their copies of the weights and optimizer state happen to lie in memory
    (separate copies run up to two points apart with identical code: see docs/benchmarks.md).
    The weights follow a mixed trajectory, which timing does not mind.
    """
    model = copy.deepcopy(base_model)
    base = torch.optim.AdamW(model.parameters(), lr=LR)
    wrappers: dict[str, L2EWrapper] = {}
    with warnings.catch_warnings():  # several wrappers on one model: paused in turn, by design
        warnings.filterwarnings("ignore", message=".*already hooked by another live L2EWrapper")
        for arm in arm_names[1:]:
            config = arm_config(arm, seq)
            assert config is not None, f"{arm}: only the first arm is plain AdamW"
            wrappers[arm] = L2EWrapper(base, model, config=config)
    compiled = arm_names[0].startswith("compiled/")
    runner = cast(nn.Module, torch.compile(model)) if compiled else model
    opts: dict[str, torch.optim.Optimizer] = {arm_names[0]: base, **wrappers}
    step_times: dict[str, list[float]] = {arm: [] for arm in arm_names}
    arms = {arm: _paused_others(make_step(runner, opts[arm], batches, step_times[arm]), wrappers, arm)
            for arm in arm_names}
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        wall, cpu = _common.paired_times(arms, rounds=rounds, warmup=2)
    tokens = batches[0][:, :-1].numel()
    for arm, opt in wrappers.items():
        check_own_tokens(arm, opt, len(step_times[arm]), tokens)
    return _report(arm_names, opts, wall, cpu, step_times)


def check_own_tokens(arm: str, opt: L2EWrapper, steps: int, tokens: int) -> None:
    """A wrapper sharing its model with paused others selected something at every site and merged
    its own ``steps`` steps of ``tokens`` tokens and no other arm's: the paused wrappers gathered
    nothing (summed over the rows of per-position statistics, which count each position's tokens)."""
    fractions = [float(site.selected_fraction) for site in opt.sites.values()]
    assert all(f > 0.0 for f in fractions), f"{arm}: a site selected nothing ({fractions})"
    counts = {int(site.count.sum()) for site in opt.sites.values()}
    assert counts == {steps * tokens}, f"{arm}: {counts} tokens merged in {steps} steps of {tokens}"


def _chosen_arms(names: str) -> list[str]:
    """``--arms``: a comma-separated subset of ARMS; AdamW, the baseline, always comes first."""
    chosen = [name for name in names.split(",") if name and name != "adamw"]
    unknown = sorted(set(chosen) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; choose from {ARMS}")
    return ["adamw", *dict.fromkeys(chosen)]


def _paused_others(run: Callable[[], float], wrappers: dict[str, L2EWrapper], arm: str) -> Callable[[], float]:
    """``run`` with every wrapper but ``arm``'s paused."""
    others = [opt for name, opt in wrappers.items() if name != arm]

    def paused_run() -> float:
        with contextlib.ExitStack() as stack:
            for opt in others:
                stack.enter_context(opt.paused())
            return run()

    return paused_run


def _report(
    arm_names: list[str], opts: dict[str, torch.optim.Optimizer], wall: dict[str, list[float]],
    cpu: dict[str, list[float]], step_times: dict[str, list[float]],
) -> tuple[list[list[Any]], dict[str, Any]]:
    base = arm_names[0]
    warm = 2  # the step-time lists include the warm-up calls
    rows, arms_out = [], {}
    for arm in arm_names:
        ratio = _common.paired_ratio(cpu[arm], cpu[base])
        wall_ratio = _common.paired_ratio(wall[arm], wall[base])
        step_ratio = _common.paired_ratio(step_times[arm][warm:], step_times[base][warm:])
        target = TARGETS.get(arm)
        met = None if target is None else ratio <= target
        arms_out[arm] = {
            "kernel": _kernel(opts[arm], arm),
            "median_cpu_s": _common.median(cpu[arm]),
            "median_wall_s": _common.median(wall[arm]),
            "ratio_to_adamw": ratio,
            "wall_ratio_to_adamw": wall_ratio,
            "median_step_call_cpu_s": _common.median(step_times[arm][warm:]),
            "step_call_ratio_to_adamw": step_ratio,
            "sites": len(getattr(opts[arm], "sites", {})),
            "target": target,
            "target_met": met,
        }
        rows.append(
            [arm, _common.median(cpu[arm]), ratio, wall_ratio, _common.median(step_times[arm][warm:]),
             step_ratio, "-" if target is None else f"<= {target}",
             "-" if met is None else ("met" if met else "MISSED")]
        )
    return rows, arms_out


def _kernel(opt: torch.optim.Optimizer, arm: str) -> str:
    """The tap implementation an arm ran on CPU (``"-"`` for plain AdamW)."""
    if not isinstance(opt, L2EWrapper):
        return "-"
    config = opt.config
    return pick_kernel(config.kernel, fusable=config.fusable, device_type="cpu",
                       compiling=arm.startswith("compiled/"), triton_ok=False, native_ok=native_tap.available())


def _check_inhibition_live(
    models: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer], base: str
) -> None:
    """The timed L2E/MEmeL arms really inhibited: selections happened and parameters moved off AdamW's."""
    for arm, opt in opts.items():
        if arm == base:
            continue
        assert isinstance(opt, L2EWrapper)
        fractions = [float(site.selected_fraction) for site in opt.sites.values()]
        assert all(f > 0.0 for f in fractions), f"{arm}: a site selected nothing ({fractions})"
        differs = any(
            not torch.equal(a, b)
            for a, b in zip(models[base].parameters(), models[arm].parameters())
        )
        assert differs, f"{arm}: parameters equal AdamW's; the inhibition did nothing"


OPTIONS: dict[str, _common.Default] = {"rounds": (3, 20), "batch": 4, "seq": (32, 128)}


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model) arms")
    parser.add_argument("--shared", action="store_true",
                        help="every arm steps one model and one AdamW (wrappers paused in turn)")
    parser.add_argument("--arms", default=None,
                        help="comma-separated arms to time (default: all); AdamW is always timed")


def main(argv: list[str] | None = None) -> None:
    _common.main("step_overhead", __doc__, run, argv, OPTIONS, extra=_flags)


if __name__ == "__main__":
    main()
