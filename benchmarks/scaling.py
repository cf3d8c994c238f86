"""Scaling study: does inhibiting *monosemantic* values matter more as models grow?

    python -m benchmarks.reproduce scaling [--quick] [--out DIR] [--workers 2]
    python -m benchmarks.reproduce scaling --report --out DIR [--results DIR] [--figures DIR]

Pythia-shaped GPT-NeoX models (head size 32, byte vocabulary, random init) of several sizes,
trained on equal tokens with four arms -- AdamW, L2E, the random-selection control (the same
penalty on a random 2% of values) and the faithful MEmeL (Reverse Deactivation of each
sequence's top-1 score) -- over seeds, on the English corpus (the standard library's prose) and
on the code corpus (its Python). Each run is resumable and skipped once its result JSON exists
(``benchmarks/_scaling_run.py``); ``--workers`` processes (one torch thread each) take the runs
in order: size by size from the smallest, within a size seed by seed. ``--report`` rebuilds the
summary JSON, the figure and the markdown tables from whatever runs have finished
(``benchmarks/_scaling_report.py``). ``--quick`` is the CI size: tiny models, a temporary
output folder unless ``--out`` is given; it never writes under docs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import pathlib
import sys
import tempfile
import time
from typing import Any

from . import _scaling_report
from ._scaling_run import ARMS, Job, Plan, jobs, run_job

FULL = Plan(
    sizes=((32, 2), (64, 2), (128, 3), (256, 4)), seeds=(0, 1, 2), corpora=("english", "code"),
    arms=tuple(ARMS), steps=1000, batch=8, seq=128, lr=3e-3, corpus_bytes=2_000_000, eval_batches=16,
    probe_windows=64, warmup_steps=10, checkpoint_every=100, log_every=100,
)
QUICK = Plan(
    sizes=((32, 1), (32, 2)), seeds=(0, 1), corpora=("english", "code"), arms=tuple(ARMS), steps=3,
    batch=2, seq=16, lr=3e-3, corpus_bytes=40_000, eval_batches=1, probe_windows=4, warmup_steps=1,
    checkpoint_every=2, log_every=1,
)


def log(message: str) -> None:
    """One progress line: UTC time, process, message (the study's log is these lines)."""
    print(f"{time.strftime('%H:%M:%S', time.gmtime())} [{multiprocessing.current_process().name}] {message}",
          flush=True)


def _worker(queue: Any, done: Any, plan: Plan, out: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    corpora: dict[str, Any] = {}
    while (job := queue.get()) is not None:
        start = time.perf_counter()
        result = run_job(job, plan, _corpus(corpora, job.corpus, plan), pathlib.Path(out), log)
        done.put((job.name, time.perf_counter() - start, result is not None and "val_loss" in result))


def run_study(plan: Plan, out: pathlib.Path, workers: int, threads: int = 1) -> None:
    """Run every missing job of ``plan`` with ``workers`` processes; log progress and a study ETA."""
    todo = [j for j in jobs(plan) if not (out / "runs" / f"{j.name}.json").exists()]
    (out / "plan.json").write_text(json.dumps(dataclasses.asdict(plan), indent=1))  # the report's reference
    log(f"study: {len(jobs(plan))} runs, {len(todo)} to do, {workers} workers x {threads} thread(s); out {out}")
    if workers <= 1:
        corpora: dict[str, Any] = {}
        for i, job in enumerate(todo, 1):
            run_job(job, plan, _corpus(corpora, job.corpus, plan), out, log)
            log(f"study: {i}/{len(todo)} runs done")
        return
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    queue, done = ctx.Queue(), ctx.Queue()
    for job in todo:
        queue.put(job)
    procs = [ctx.Process(target=_worker, args=(queue, done, plan, str(out), threads), name=f"w{i}")
             for i in range(workers)]
    for proc in procs:
        queue.put(None)
        proc.start()
    seconds: dict[tuple[int, int], list[float]] = {}
    for i in range(1, len(todo) + 1):
        name, wall, _ = done.get()
        job = next(j for j in todo if j.name == name)
        seconds.setdefault((job.width, job.layers), []).append(wall)
        log(f"study: {i}/{len(todo)} runs done (last: {name}, {wall:.0f} s); "
            f"study ETA {_eta(todo[i:] if i < len(todo) else [], seconds, workers)}")
    for proc in procs:
        proc.join()


def _saved_plan(out: pathlib.Path, default: Plan) -> Plan:
    """The plan the study in ``out`` ran with (its plan.json), so a report matches its runs."""
    path = out / "plan.json"
    if not path.exists():
        return default
    saved: dict[str, Any] = json.loads(path.read_text())
    saved["sizes"] = tuple(tuple(size) for size in saved["sizes"])
    for key in ("seeds", "corpora", "arms"):
        saved[key] = tuple(saved[key])
    return Plan(**saved)


def _corpus(cache: dict[str, Any], name: str, plan: Plan) -> Any:
    """The named corpus, loaded once per process (loading labels megabytes of text)."""
    from l2e_optim._lab.prose import load_named

    if name not in cache:
        cache[name] = load_named(name, max_bytes=plan.corpus_bytes)
    return cache[name]


#: Relative cost of one training step of a (width, blocks) model: a fixed per-step overhead
#: (Python, kernel launches) worth about this many parameters, plus 12 * width^2 * blocks.
#: Fitted to single-thread step times of 64x2 ... 256x4 on this machine (0.020 to 0.29 s).
STEP_OVERHEAD_PARAMS = 120_000


def step_cost(width: int, layers: int) -> float:
    return STEP_OVERHEAD_PARAMS + 12 * width * width * layers


def eta_seconds(remaining: list[Job], seconds: dict[tuple[int, int], list[float]], workers: int) -> float:
    """Remaining wall time: measured mean run time per size; an unmeasured size scales from the
    largest measured one by :func:`step_cost`."""
    if not remaining or not seconds:
        return 0.0
    mean = {size: sum(v) / len(v) for size, v in seconds.items()}
    ref = max(mean, key=lambda size: step_cost(*size))
    total = sum(mean.get((j.width, j.layers), mean[ref] * step_cost(j.width, j.layers) / step_cost(*ref))
                for j in remaining)
    return total / workers


def _eta(remaining: list[Job], seconds: dict[tuple[int, int], list[float]], workers: int) -> str:
    left = eta_seconds(remaining, seconds, workers)
    minutes, secs = divmod(int(left), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d} (~{time.strftime('%H:%M', time.gmtime(time.time() + left))} UTC)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reproduce scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for CI (seconds)")
    parser.add_argument("--out", default=None, help="runs, checkpoints and report (default runs/scaling; "
                        "--quick: a new temporary folder)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default 2; --quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from finished runs")
    parser.add_argument("--results", default=None, help="folder for scaling.json / scaling.md (default --out)")
    parser.add_argument("--figures", default=None, help="folder for scaling.png (default --out)")
    parser.add_argument("--section", default=None, help="a markdown page whose generated-tables block "
                        "(between the scaling report marker lines) is rewritten, e.g. docs/reproduction.md")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    default_out = tempfile.mkdtemp(prefix="scaling-quick-") if args.quick else "runs/scaling"
    out = pathlib.Path(args.out or default_out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.reproduce scaling " + " ".join(argv if argv is not None else sys.argv[2:])
    if args.report:
        plan = _saved_plan(out, plan)
    else:
        workers = args.workers if args.workers is not None else (1 if args.quick else 2)
        run_study(plan, out, workers, args.threads)
    results = pathlib.Path(args.results or out)
    figures = pathlib.Path(args.figures or out)
    summary = _scaling_report.build(plan, out, command=command, quick=args.quick)
    written = _scaling_report.write(summary, results, figures)
    if args.section:
        _scaling_report.update_section(pathlib.Path(args.section), summary)
        written.append(pathlib.Path(args.section))
    print(_scaling_report.markdown(summary), flush=True)
    log(f"report: {', '.join(str(p) for p in written)}")

