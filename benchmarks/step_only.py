"""The wrapper's ``step()`` alone (base step + commit of statistics and thresholds) against AdamW.

    python -m benchmarks.step_only [--smoke] [--rounds R] [--threads T]

Parameters and gradients of the Pythia-70M shape (byte vocabulary); no forward or backward in
the timed region. Arms: foreach AdamW (torch's default on CPU), fused AdamW
(``AdamW(fused=True)``), and L2EWrapper around each of them with sites on all 6 blocks
(2048 neurons each). The commit (``_commit``, what the wrapper adds to the step) is also timed
alone. Each arm's step call is interleaved with the others'; ratios are paired medians.
Correctness, asserted before any number is printed: foreach and fused AdamW agree (allclose)
and the wrapped optimizers move the parameters exactly as their bases do (strength 0).
"""

from __future__ import annotations

import argparse
import copy
import warnings
from typing import Any

import torch
from torch import nn

from l2e_optim import L2EConfig, L2EWrapper
from l2e_optim._lab.zoo import build_model, lm_loss

from . import _common


def fill_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3


def build(model: nn.Module, fused: bool, wrap: bool) -> torch.optim.Optimizer:
    base = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=not fused, fused=fused)
    if not wrap:
        return base
    return L2EWrapper(base, model, config=L2EConfig(layers="all", strength=0.0, warmup_steps=0))


def populate_statistics(model: nn.Module, opt: torch.optim.Optimizer, seq: int) -> None:
    """One real forward/backward/step so the sites hold statistics (the commit is branch-free)."""
    ids = _common.byte_batches(2, seq, count=1)[0]
    torch.autograd.backward(lm_loss(model, ids))
    opt.step()


def check_equivalence(shape: str) -> None:
    """foreach ~ fused; wrapped (strength 0) == its base, bit for bit, over 3 steps."""
    base = build_model(shape)
    arms = {key: copy.deepcopy(base) for key in ("foreach", "fused", "l2e+foreach", "l2e+fused")}
    opts = {key: build(m, fused="fused" in key, wrap="l2e" in key) for key, m in arms.items()}
    with warnings.catch_warnings():  # synthetic gradients, no forward: the hooks never run, on purpose
        warnings.filterwarnings("ignore", message="L2E: an optimizer step was taken, but the hook of none")
        for step in range(3):
            for model, opt in zip(arms.values(), opts.values()):
                fill_grads(model, seed=step)
                opt.step()
    for a, b, c, d in zip(*(m.parameters() for m in arms.values())):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), "fused AdamW disagrees with foreach AdamW"
        assert torch.equal(a, c), "L2EWrapper(foreach AdamW) moved parameters differently"
        assert torch.equal(b, d), "L2EWrapper(fused AdamW) moved parameters differently"


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = "tiny" if args.smoke else "pythia-70m"
    seq = 17
    check_equivalence(shape)
    base = build_model(shape)
    names = ["adamw-foreach", "adamw-fused", "l2e+foreach", "l2e+fused"]
    models = {name: copy.deepcopy(base) for name in names}
    opts = {name: build(models[name], fused="fused" in name, wrap="l2e" in name) for name in names}
    for name in names:
        populate_statistics(models[name], opts[name], seq)
        fill_grads(models[name], seed=0)  # gradients stay set: every timed step reuses them
    wrapper = opts["l2e+fused"]
    assert isinstance(wrapper, L2EWrapper)
    arms: dict[str, Any] = {name: opts[name].step for name in names}
    arms["commit-only"] = wrapper._commit  # what the wrapper adds to any base step
    _, times = _common.paired_times(arms, rounds=args.rounds, warmup=3)  # CPU seconds
    ref = times["adamw-foreach"]
    params = sum(p.numel() for p in base.parameters())
    neurons = sum(site.neurons for site in wrapper.sites.values())
    rows, out = [], {}
    for name, values in times.items():
        ratio = _common.paired_ratio(values, ref)
        out[name] = {"median_cpu_s": _common.median(values), "ratio_to_adamw_foreach": ratio}
        rows.append([name, _common.median(values), ratio])
    out["l2e+fused"]["ratio_to_adamw_fused"] = _common.paired_ratio(times["l2e+fused"], times["adamw-fused"])
    out["l2e+foreach"]["ratio_to_adamw_foreach"] = _common.paired_ratio(times["l2e+foreach"], ref)
    print(f"step_only: shape={shape} params={params} sites={len(wrapper.sites)} neurons={neurons} "
          f"rounds={args.rounds} threads={args.threads} loadavg={_common.machine()['loadavg']}")
    print(_common.table(["arm", "median CPU s", "ratio/AdamW-foreach"], rows))
    print(f"l2e+fused / adamw-fused = {out['l2e+fused']['ratio_to_adamw_fused']:.4f}")
    return {"shape": shape, "params": params, "neurons": neurons, "smoke": args.smoke,
            "rounds": args.rounds, "arms": out,
            "checks": {"fused_matches_foreach": True, "wrapper_matches_base": True}}


OPTIONS: dict[str, _common.Default] = {"rounds": (5, 40)}


def main(argv: list[str] | None = None) -> None:
    _common.main("step_only", __doc__, run, argv, OPTIONS)


if __name__ == "__main__":
    main()
