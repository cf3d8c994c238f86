"""The demo's summary: settings, machine, and per run the table's numbers and its analysis."""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from .._src.config import L2EConfig
from .._src.discovery import discover_sites
from .._src.wrapper import L2EWrapper
from .analysis import analyze
from .pretrain import RunResult
from .report import MONITOR_ONLY


def demo_summary(
    args: argparse.Namespace,
    sources: Sequence[str],
    results: dict[str, RunResult],
    corpus: Any,
    analysis_tokens: int,
    wall: float,
) -> dict[str, Any]:
    """The JSON summary: settings, machine, and per run the table's numbers and its analysis."""
    base = results.get("adamw")
    base_time = statistics.median(base.step_seconds[1:] or base.step_seconds) if base else None
    runs: dict[str, Any] = {}
    for method, run in results.items():
        inhibited = discover_sites(run.model, L2EConfig().layers)
        found = analyze(run.model, corpus.val, corpus.val_features, seq_len=run.spec.seq_len,
                        max_tokens=analysis_tokens, device=run.spec.device, feature_names=corpus.feature_names)
        tail = run.train_loss[-max(1, len(run.train_loss) // 10):]
        train_loss = sum(tail) / len(tail)
        val_loss = run.val_loss[-1][1]
        step_time = statistics.median(run.step_seconds[1:] or run.step_seconds)
        sites = {}
        if isinstance(run.optimizer, L2EWrapper):
            sites = {name: {"threshold": float(s.threshold), "selected_fraction": float(s.selected_fraction)}
                     for name, s in run.optimizer.sites.items()}
        runs[method] = {
            "train_loss": train_loss,
            "train_ppl": math.exp(train_loss),
            "val_loss": val_loss,
            "val_ppl": math.exp(val_loss),
            "tokens_per_second": run.tokens_per_second,
            "median_step_seconds": step_time,
            "step_time_ratio": step_time / base_time if base_time else None,
            "sites": sites,
            "sites_role": "monitor" if method in MONITOR_ONLY else "inhibits",
            "high_ms_share": found.high_ms_share(inhibited),
            "fkr_2pct": found.fkr_at(0.02, inhibited),
            "analysis_sites": inhibited,
            "analysis": found.to_dict(),
        }
    spec = next(iter(results.values())).spec
    return {
        "settings": {**{k: v for k, v in vars(spec).items() if k not in ("method", "l2e")},
                     "data": args.data or "code", "sources": len(sources), "train_bytes": corpus.train.numel(),
                     "features": list(corpus.feature_names),
                     "threads": torch.get_num_threads()},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpus": cpu_count()},
        "wall_seconds": wall,
        "runs": runs,
    }


def cpu_count() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_curves(results: dict[str, RunResult], summary: dict[str, Any]) -> dict[str, Any]:
    """What the demo figure draws, per run."""
    return {
        method: {
            "train_loss": run.train_loss,
            "val_loss": run.val_loss,
            "thresholds": run.thresholds,
            "selected_fraction": run.selected_fraction,
            "neuron_ms": summary["runs"][method]["analysis"]["neuron_scores"],
        }
        for method, run in results.items()
    }
