"""L2E state bytes per neuron, and the peak memory of a training step against AdamW.

    python -m benchmarks.memory [--smoke] [--repeats R] [--batch B] [--seq S]

State: counted from the real tensors of every site (mean, var, threshold, count,
selected_fraction, nonfinite, and the step accumulator), divided by the number of neurons.

Peak memory (CPU): torch has no CPU allocator statistics and ``tracemalloc`` does not see its
buffers, so each arm trains in its own fresh subprocess and reads the kernel's resident-set
high-water mark (``VmHWM`` in /proc/self/status). The child builds the model and optimizer,
runs one warm-up step (AdamW allocates its moments lazily), resets the high-water mark
(``echo 5 > /proc/self/clear_refs``), runs the measured steps and reports the peak. glibc is
told to serve every allocation over 64 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed
activations go back to the kernel and the RSS follows live memory rather than the heap's
history. Two figures per arm: the absolute peak RSS, and the *training footprint* = peak RSS
minus the RSS after imports and before the model existed (model, gradients, AdamW moments,
activations, L2E state and transients). Children for the arms run interleaved (A, B, C, A,
B, C, ...) and the medians are compared. Correctness: the L2E child asserts its sites selected
values (the inhibition ran) and the state count matches the formula 16 + 36/N bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
from typing import Any

from . import _common

_REPO = pathlib.Path(__file__).resolve().parents[1]
ARMS = ("adamw", "l2e/mid-2", "l2e/all")
#: Targets from the issue.
TARGET_STATE_BYTES_PER_NEURON = 32.0
TARGET_PEAK_RATIO = 1.01


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    assert match is not None, f"no {field} in /proc/self/status"
    return int(match.group(1))


def child(arm: str, smoke: bool, batch: int, seq: int, steps: int) -> dict[str, Any]:
    """Runs in its own process: train ``steps`` steps of ``arm`` and report memory figures."""
    import gc

    import torch

    from l2e_optim import L2EConfig, L2EWrapper

    from l2e_optim._lab.zoo import PlainLM, build_model, lm_loss

    torch.set_num_threads(1)
    batches = _common.byte_batches(batch, seq + 1, count=steps + 1)
    gc.collect()
    before_model = _status_kib("VmRSS")
    model = PlainLM(width=64) if smoke else build_model("pythia-70m")
    opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if arm != "adamw":
        layers = arm.split("/")[1]
        opt = L2EWrapper(opt, model, config=L2EConfig(layers=layers, warmup_steps=0))  # type: ignore[arg-type]

    def train_step(ids: torch.Tensor) -> None:
        torch.autograd.backward(lm_loss(model, ids))
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step(batches[0])
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for ids in batches[1:]:
        train_step(ids)
    peak = _status_kib("VmHWM")
    out: dict[str, Any] = {"arm": arm, "rss_before_model_kib": before_model, "peak_kib": peak}
    if isinstance(opt, L2EWrapper):
        sites = list(opt.sites.values())
        assert all(float(s.selected_fraction) > 0 for s in sites), "a site selected nothing"
        state = sum(t.nbytes for s in sites for t in (*s.tensors().values(), s.accumulator))
        neurons = sum(s.neurons for s in sites)
        # fp32 mean, var and 2N accumulator sums; scalars: fp32 threshold, selected_fraction and
        # 3 accumulator slots, int64 count and nonfinite = 36 bytes per site.
        formula = sum(16 * s.neurons + 36 for s in sites)
        assert state == formula, f"state bytes {state} != 16N + 36 per site ({formula})"
        out.update(state_bytes=state, neurons=neurons, sites=len(sites))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for r in range(args.repeats):
        order = list(ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)])
        for arm in order:
            cmd = [sys.executable, "-m", "benchmarks.memory", "--child", arm, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps)] + (["--smoke"] if args.smoke else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=_REPO)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            runs[arm].append(_common.parse(proc.stdout))
    base_peak = _common.median([x["peak_kib"] for x in runs["adamw"]])
    base_foot = _common.median([x["peak_kib"] - x["rss_before_model_kib"] for x in runs["adamw"]])
    rows, arms_out = [], {}
    for arm in ARMS:
        peak = _common.median([x["peak_kib"] for x in runs[arm]])
        foot = _common.median([x["peak_kib"] - x["rss_before_model_kib"] for x in runs[arm]])
        entry: dict[str, Any] = {
            "peak_rss_mib": peak / 1024, "footprint_mib": foot / 1024,
            "peak_ratio": peak / base_peak, "footprint_ratio": foot / base_foot,
            "footprint_delta_mib": (foot - base_foot) / 1024,
        }
        per_neuron = None
        if arm != "adamw":
            last = runs[arm][-1]
            per_neuron = last["state_bytes"] / last["neurons"]
            entry.update(state_bytes=last["state_bytes"], neurons=last["neurons"],
                         state_bytes_per_neuron=per_neuron,
                         state_target_met=per_neuron <= TARGET_STATE_BYTES_PER_NEURON,
                         peak_target_met=foot / base_foot <= TARGET_PEAK_RATIO)
        arms_out[arm] = entry
        rows.append([arm, peak / 1024, foot / 1024, foot / base_foot, (foot - base_foot) / 1024,
                     "-" if per_neuron is None else per_neuron,
                     "-" if arm == "adamw" else ("met" if entry["peak_target_met"] else "MISSED")])
    print(f"memory: batch={args.batch} seq={args.seq} steps={args.steps} repeats={args.repeats} "
          f"smoke={args.smoke} loadavg={_common.machine()['loadavg']}")
    print(_common.table(["arm", "peak RSS MiB", "footprint MiB", "footprint ratio", "delta MiB",
                         "state B/neuron", f"<= {TARGET_PEAK_RATIO}x"], rows))
    return {"batch": args.batch, "seq": args.seq, "steps": args.steps, "repeats": args.repeats,
            "smoke": args.smoke, "arms": arms_out,
            "targets": {"state_bytes_per_neuron": TARGET_STATE_BYTES_PER_NEURON,
                        "footprint_ratio": TARGET_PEAK_RATIO},
            "checks": {"sites_select": True, "state_bytes_match_formula": True}}


OPTIONS: dict[str, _common.Default] = {"repeats": (1, 3), "batch": 4, "seq": (32, 64), "steps": 3}


def _child_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--child", choices=ARMS, default=None, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> None:
    args = _common.parse_args(__doc__, argv, OPTIONS, smoke_help="tiny torch-only model, one repeat (for CI)",
                              extra=_child_option)
    if args.child is not None:
        print(_common.JSON_PREFIX + json.dumps(child(args.child, args.smoke, args.batch, args.seq, args.steps)))
        return
    _common.emit("memory", run(args))


if __name__ == "__main__":
    main()
