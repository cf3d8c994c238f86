"""Shared plumbing of the benchmarks: the command line, machine description, paired timing,
table and JSON output, and the text batches they train on."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from l2e_optim._lab.corpus import batches
from l2e_optim._lab.zoo import stdlib_bytes

#: Every benchmark's machine-readable result is one stdout line starting with this prefix.
JSON_PREFIX = "BENCH_JSON "


def machine() -> dict[str, Any]:
    """Where and when a number was measured; the load average is part of every result."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        # glibc allocator settings change CPU timings a lot (docs/benchmarks.md): record them.
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
    }


#: An integer option's default: one value, or ``(smoke, full)`` where ``--smoke`` changes it.
Default = int | tuple[int, int]


def parse_args(
    doc: str | None,
    argv: Sequence[str] | None,
    options: Mapping[str, Default],
    *,
    smoke_help: str = "tiny model, few rounds (for CI)",
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The command line every benchmark shares: ``--smoke``, ``--threads`` and integer options.

    ``options`` maps an option's name (``"max_log_n"`` for ``--max-log-n``) to its default; an
    explicit value on the command line wins over both of a ``(smoke, full)`` pair. ``extra`` adds
    the few options that are not integers. Pins torch's threads before returning.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    for name, default in options.items():
        shown = f"{default[1]} ({default[0]} with --smoke)" if isinstance(default, tuple) else default
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"default {shown}")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    for name, default in options.items():
        if getattr(args, name) is None:
            pair = default if isinstance(default, tuple) else (default, default)
            setattr(args, name, pair[0] if args.smoke else pair[1])
    # On a shared 2-core box one thread gives steadier medians.
    torch.set_num_threads(args.threads)
    return args


def main(
    name: str,
    doc: str | None,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    argv: Sequence[str] | None,
    options: Mapping[str, Default],
    **parse_kw: Any,
) -> dict[str, Any]:
    """A benchmark's whole ``main``: parse the shared command line, run, emit the JSON line."""
    result = run(parse_args(doc, argv, options, **parse_kw))
    emit(name, result)
    return result


def byte_batches(batch: int, seq_len: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` batches ``[batch, seq_len]`` of real text bytes (the standard library's sources)."""
    tokens = stdlib_bytes(limit=batch * seq_len * count + seq_len + 1)
    windows = batches(tokens, batch_size=batch, seq_len=seq_len - 1, seed=seed)
    return [next(windows) for _ in range(count)]


def paired_times(
    arms: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 2
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per call of each arm, interleaved round by round (A, B, C, B, C, A, ...).

    Returns ``(wall, cpu)``: wall-clock seconds and this process's CPU seconds per call. On a
    shared machine the CPU time is the steadier figure (time spent waiting for a core does not
    count), as long as torch runs on few threads. The order of the arms rotates each round, so a
    load burst lands on every arm alike; per-round ratios against the first arm cancel most of it.
    """
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            arms[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return wall, cpu


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and count; ``None`` for no values."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on the ranks; ties ranked in order of appearance);
    ``None`` for fewer than 3 points, 0.0 when either side is constant."""
    if len(x) < 3:
        return None

    def ranks(v: Sequence[float]) -> list[float]:
        out = [0.0] * len(v)
        for rank, i in enumerate(sorted(range(len(v)), key=v.__getitem__)):
            out[i] = float(rank)
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / den if den > 0 else 0.0


def paired_ratio(times: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of ``times[r] / base[r]`` (the paired estimate of the slowdown)."""
    return median([t / b for t, b in zip(times, base)])


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([line, rule, *body])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0.0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def emit(name: str, result: dict[str, Any]) -> None:
    """Print the result as one JSON line (``BENCH_JSON {...}``); non-finite numbers are refused."""
    payload = {"benchmark": name, "machine": machine(), **result}
    _check_finite(payload, name)
    print(JSON_PREFIX + json.dumps(payload, sort_keys=True), flush=True)


def parse(stdout: str) -> dict[str, Any]:
    """The JSON result from a benchmark's stdout (the last ``BENCH_JSON`` line)."""
    lines = [line for line in stdout.splitlines() if line.startswith(JSON_PREFIX)]
    if not lines:
        raise ValueError("no BENCH_JSON line in the output")
    result: dict[str, Any] = json.loads(lines[-1][len(JSON_PREFIX) :])
    return result


def _check_finite(value: Any, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} is not finite: {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{path}[{i}]")
