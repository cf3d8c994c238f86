"""Shared plumbing of the benchmarks: machine description, paired timing, table and JSON output."""

from __future__ import annotations

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


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads: on a shared 2-core box one thread gives steadier medians."""
    torch.set_num_threads(threads)


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
