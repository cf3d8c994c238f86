"""GPU check: the CUDA tests, then step overhead and peak memory at Pythia widths, in one command.

    python -m benchmarks.gpu_check [--out FILE] [--budget S] [--widths 70m,410m,1.4b]
                                   [--modes eager,compiled,captured] [--no-tests]

On a machine with a CUDA GPU it (1) runs the ``cuda`` tests (``tests/test_cuda.py``: the Triton
tap against the eager one on the device, bit-for-bit repeatability, no host sync in a step,
whole-step CUDA-graph capture and replay, with each tap kernel); (2) times one training step of
AdamW, L2E ("mid-2" and "all" sites, the default kernel, which is Triton on CUDA; and "all" with
the eager tap) and MEmeL ("all") on GPT-NeoX models of the Pythia-70M, -410M and -1.4B widths
(Pythia's vocabulary, random tokens, bf16 autocast, AdamW lr 1e-4), in three modes: eager,
``torch.compile(model)``, and the whole step (forward, backward, ``step()``) captured in one CUDA
graph; (3) records the peak memory of each arm. It prints a table, writes one JSON file and the
``BENCH_JSON`` line. Each part has a time cap inside a total budget (default 420 s, so the run
ends within 8 minutes on one H100-class card, model building included); a part that does not fit
is reported as skipped, with the reason, never dropped silently. Without a GPU it says so and
exits 0. ``--device cpu --smoke`` runs the timing harness on a tiny model on CPU (for the test
suite; the captured mode needs CUDA).

Eager and compiled arms share one model and one AdamW (only the running arm's wrapper is active;
the others are paused), interleaved round by round, so the largest width fits one card; captured
arms are captured and replayed one after another (one graph in memory at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from l2e_optim import L2EConfig, L2EWrapper
from l2e_optim._lab.zoo import build_model

from . import _common

#: The zoo's GPT-NeoX shapes of the Pythia models, and the (batch, seq) timed at each.
WIDTHS = {"70m": "pythia-70m", "410m": "pythia-410m", "1.4b": "pythia-1.4b", "tiny": "tiny"}
BATCHES = {"70m": (16, 2048), "410m": (8, 2048), "1.4b": (4, 2048), "tiny": (2, 32)}
PYTHIA_VOCAB = 50304
ARMS: dict[str, L2EConfig | None] = {
    "adamw": None,
    "l2e/mid-2": L2EConfig(layers="mid-2", warmup_steps=0),
    "l2e/all": L2EConfig(layers="all", warmup_steps=0),
    "l2e/all/eager": L2EConfig(layers="all", warmup_steps=0, kernel="eager"),
    "memel/all": L2EConfig(inhibition="memel", layers="all", warmup_steps=0),
}
#: Compiling costs a minute or more per arm at 1.4B: the compiled mode times the two that matter.
COMPILED_ARMS = ("adamw", "l2e/all")
#: Seconds of timed rounds per (width, mode) part, after warm-up; and for the cuda tests.
PART_CAP_S = {"eager": 15.0, "compiled": 30.0, "captured": 15.0}
TESTS_CAP_S = 120.0
LR = 1e-4


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="gpu_check.json", help="where to write the JSON result")
    parser.add_argument("--widths", default="70m,410m,1.4b", help=f"comma list of {sorted(WIDTHS)}")
    parser.add_argument("--modes", default="eager,compiled,captured", help="comma list of eager,compiled,captured")
    parser.add_argument("--no-tests", action="store_true", help="skip the cuda tests")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: exercise the harness")


def main(argv: list[str] | None = None) -> int:
    args = _common.parse_args(__doc__, argv, {"budget": 420}, extra=_flags,
                              smoke_help="tiny width, few rounds (with --device cpu)")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check.")
        return 0
    result = run(args)
    print(_common.table(["width", "mode", "arm", "median s", "ratio", "peak MiB", "mem ratio", "note"], _rows(result)))
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1, sort_keys=True)
    _common.emit("gpu_check", result)
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.monotonic() + args.budget
    device = torch.device(args.device)
    widths = ["tiny"] if args.smoke else args.widths.split(",")
    modes = args.modes.split(",")
    result: dict[str, Any] = {"device": _device_name(device), "smoke": args.smoke, "budget_s": args.budget}
    result["tests"] = {"skipped": "--no-tests"} if args.no_tests or args.device != "cuda" else run_tests()
    parts: list[dict[str, Any]] = []
    # Cheapest first: eager at every width, then captured, then compiled (compiling is slow).
    for mode in [m for m in ("eager", "captured", "compiled") if m in modes]:
        for width in widths:
            parts.append(run_part(width, mode, device, deadline, rounds=3 if args.smoke else 30))
    result["parts"] = parts
    result["checks"] = {"tests_passed": result["tests"].get("passed", True) is not False}
    return result


def run_tests() -> dict[str, Any]:
    """``pytest -m cuda tests/test_cuda.py`` in a subprocess, capped at TESTS_CAP_S."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TESTS_CAP_S)
    except subprocess.TimeoutExpired as error:
        return {"passed": False, "error": f"timed out after {TESTS_CAP_S} s", "tail": str(error.stdout)[-2000:]}
    return {"passed": done.returncode == 0, "returncode": done.returncode, "tail": done.stdout[-2000:]}


def run_part(width: str, mode: str, device: torch.device, deadline: float, rounds: int) -> dict[str, Any]:
    """One (width, mode): its arms' median step seconds, ratios and peak memory, or why skipped."""
    part: dict[str, Any] = {"width": width, "mode": mode}
    left = deadline - time.monotonic()
    need = PART_CAP_S[mode] + (90.0 if mode == "compiled" else 20.0)  # + building, compiling
    if left < need:
        return {**part, "skipped": f"budget: {left:.0f} s left, the part needs about {need:.0f} s"}
    if mode == "captured" and device.type != "cuda":
        return {**part, "skipped": "CUDA-graph capture needs a CUDA device"}
    batch, seq = BATCHES[width]
    part.update(batch=batch, seq=seq)
    try:
        vocab = 256 if width == "tiny" else PYTHIA_VOCAB
        with device:  # initialised on the device: a 1.4B model's CPU init alone takes half a minute
            model: nn.Module = build_model(WIDTHS[width], vocab_size=vocab, max_positions=seq)
        model.train()
        ids = torch.randint(0, vocab, (batch, seq + 1), device=device)
        cap = min(PART_CAP_S[mode], deadline - time.monotonic() - 10.0)
        if mode == "captured":
            arms = time_captured(model, ids, cap, rounds)
        else:
            arms = time_shared(model, ids, mode, cap, rounds)
    except Exception as error:  # a GPU run is rare: record the failure and go on to the next part
        return {**part, "error": f"{type(error).__name__}: {error}"[:2000]}
    finally:
        _release(device)
    base = arms["adamw"]
    for arm in arms.values():
        arm["ratio_to_adamw"] = _common.paired_ratio(arm["seconds"], base["seconds"])
        arm["memory_ratio_to_adamw"] = arm["peak_bytes"] / max(base["peak_bytes"], 1)
        arm["median_s"] = _common.median(arm["seconds"])
    return {**part, "arms": arms}


def step_fn(model: nn.Module, runner: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> Callable[[], None]:
    """One training step (bf16 autocast on CUDA; the autocast cache off so graphs may capture it)."""
    def step() -> None:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.is_cuda, cache_enabled=False):
            logits = runner(input_ids=ids[:, :-1]).logits
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        torch.autograd.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_shared(model: nn.Module, ids: torch.Tensor, mode: str, cap: float, rounds: int) -> dict[str, Any]:
    """Eager or compiled arms on one model and one AdamW, interleaved; others' hooks paused."""
    names = list(COMPILED_ARMS) if mode == "compiled" else list(ARMS)
    base = torch.optim.AdamW(model.parameters(), lr=LR)
    with warnings.catch_warnings():  # several wrappers on one model, on purpose: one runs at a time
        warnings.filterwarnings("ignore", message=".*already hooked by another live L2EWrapper")
        wrappers = {n: L2EWrapper(base, model, config=c) for n, c in ARMS.items() if n in names and c is not None}
    runner: nn.Module = torch.compile(model) if mode == "compiled" else model  # type: ignore[assignment]
    opts: dict[str, torch.optim.Optimizer] = {n: wrappers.get(n, base) for n in names}

    def arm_step(name: str) -> Callable[[], None]:
        inner = step_fn(model, runner, opts[name], ids)

        def step() -> None:
            with contextlib.ExitStack() as stack:
                for other, wrapper in wrappers.items():
                    if other != name:
                        stack.enter_context(wrapper.paused())
                inner()
        return step

    try:
        # Guard on hooks, so no arm can run a graph traced for another (see docs/benchmarks.md).
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            out = _interleave({n: arm_step(n) for n in names}, ids.device, cap, rounds)
        for name, wrapper in wrappers.items():
            out[name]["selected_fraction"] = _check_live(name, wrapper)
        return out
    finally:
        for wrapper in wrappers.values():
            wrapper.remove_hooks()


def time_captured(model: nn.Module, ids: torch.Tensor, cap: float, rounds: int) -> dict[str, Any]:
    """Each arm's whole step captured in a CUDA graph and replayed; one arm at a time."""
    # torch's CUDA embedding backward reads a count on the host, which capture forbids (not
    # L2E's: every arm alike trains without the embedding here).
    embeddings: nn.Module = model.get_input_embeddings()  # type: ignore[operator]
    embeddings.requires_grad_(False)
    static = ids.clone()
    out: dict[str, Any] = {}
    for name, config in ARMS.items():
        base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, capturable=True)
        opt: torch.optim.Optimizer = base if config is None else L2EWrapper(base, model, config=config)
        step = step_fn(model, model, opt, static)
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        out[name] = _interleave({name: graph.replay}, ids.device, cap / len(ARMS), rounds)[name]
        if isinstance(opt, L2EWrapper):
            out[name]["selected_fraction"] = _check_live(name, opt)
            opt.remove_hooks()
        del graph, opt, base
        _release(ids.device)
    return out


def _interleave(steps: dict[str, Callable[[], None]], device: torch.device, cap: float, rounds: int) -> dict[str, Any]:
    """Warm up each arm twice, then rotate through the arms until ``rounds`` or ``cap`` seconds."""
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(steps)
    for _ in range(2):
        for name in names:
            steps[name]()
    sync()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    peak: dict[str, int] = {n: 0 for n in names}
    end = time.monotonic() + max(cap, 0.0)
    for r in range(rounds):
        if r >= 3 and time.monotonic() > end:
            break
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            steps[name]()
            sync()
            seconds[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    return {n: {"seconds": seconds[n], "peak_bytes": peak[n]} for n in names}


def _check_live(name: str, opt: L2EWrapper) -> list[float]:
    """An arm's sites really selected values (so a number is never posted for a no-op)."""
    fractions = [float(s.selected_fraction) for s in opt.sites.values()]
    if not all(f > 0.0 for f in fractions):
        raise AssertionError(f"{name}: a site selected nothing ({fractions}); the timing is void")
    return fractions


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _rows(result: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for part in result["parts"]:
        note = part.get("skipped") or part.get("error")
        if note:
            rows.append([part["width"], part["mode"], "-", "-", "-", "-", "-", str(note)[:60]])
            continue
        for name, arm in part["arms"].items():
            rows.append([part["width"], part["mode"], name, arm["median_s"], arm["ratio_to_adamw"],
                         arm["peak_bytes"] / 2**20, arm["memory_ratio_to_adamw"], ""])
    return rows


if __name__ == "__main__":
    sys.exit(main())
