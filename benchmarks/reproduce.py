"""Reproduce the L2E paper's claims at CPU scale: scale, fkr, compare, threshold (or all).

    python -m benchmarks.reproduce EXPERIMENT [EXPERIMENT ...] [--quick] [--out DIR] [--figures DIR]
        [--data code|english|mixed]
    python -m benchmarks.reproduce scaling [--quick] [--report] [--out DIR]   (benchmarks/scaling.py)

Results go to ``DIR/<experiment>.json`` (default ``docs/results``), figures to
``docs/figures/<experiment>.png``. With ``--quick`` both default to ``runs/reproduce-quick``: a
quick run never overwrites the committed results and figures. Every run trains Pythia-shaped
GPT-NeoX models (random init, byte vocabulary) on an embedded corpus (``--data``: the
interpreter's standard-library Python, labelled per byte by ``tokenize``; its English prose, or
both) with the demo's ``pretrain.train``; see docs/reproduction.md.

1. scale: models of growing width and depth, same tokens; per-layer feature-specific MS and
   the K-S statistic between feature-specific and overall MS.
2. fkr: False Killing Rate against inhibition level, per layer and scale, and on synthetic
   data with planted monosemantic neurons.
3. compare: AdamW vs L2E vs MEmeL at equal steps over seeds, plus ablations.
4. threshold: the moving threshold against the exact quantile of each step's scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from l2e_optim import L2EConfig, L2EWrapper, monosemanticity_scores
from l2e_optim._lab.corpus import Corpus, batches
from l2e_optim._lab.prose import DATA_NAMES, load_named
from l2e_optim._lab.pretrain import Method, RunResult, RunSpec, setup, train
from l2e_optim._lab.zoo import lm_loss

from . import _common, _figures, _probe
from ._variants import EXTRA_VARIANTS, VARIANTS

EXPERIMENTS = ("scale", "fkr", "compare", "threshold")
FKR_LEVELS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.1]


@dataclasses.dataclass(frozen=True)
class Size:
    """How big every experiment is (the whole point of --quick)."""

    corpus_bytes: int
    batch: int
    seq: int
    scale_steps: int
    scale_models: tuple[tuple[int, int], ...]  # (width, layers), head size 16
    probe_windows: int
    compare_steps: int
    compare_width: int
    compare_layers: int
    seeds: tuple[int, ...]
    threshold_steps: int
    planted_tokens: int
    planted_neurons: int
    warmup_steps: int  # L2E/MEmeL warm-up (steps before any inhibition)


FULL = Size(
    corpus_bytes=400_000, batch=8, seq=64, scale_steps=1000,
    scale_models=((32, 2), (48, 3), (64, 4), (96, 4), (128, 6)),
    probe_windows=64, compare_steps=600, compare_width=64, compare_layers=4, seeds=(0, 1, 2),
    threshold_steps=300, planted_tokens=8192, planted_neurons=512, warmup_steps=10,
)
QUICK = Size(
    corpus_bytes=40_000, batch=2, seq=16, scale_steps=3,
    scale_models=((16, 1), (16, 2), (32, 2), (32, 3), (48, 3)),
    probe_windows=4, compare_steps=3, compare_width=16, compare_layers=2, seeds=(0, 1),
    threshold_steps=4, planted_tokens=512, planted_neurons=64, warmup_steps=1,
)


def spec(size: Size, method: Method, *, steps: int, width: int, layers: int, seed: int,
         l2e: L2EConfig | None = None) -> RunSpec:
    return RunSpec(
        method=method, shape="tiny", steps=steps, batch_size=size.batch, seq_len=size.seq,
        seed=seed, width=width, layers=layers, l2e=l2e, eval_every=0,
        eval_batches=2 if size is QUICK else 8,
    )


def probe(model: nn.Module, corpus: Corpus, size: Size) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-layer MS of the model's MLP neurons on fixed validation windows, and token features."""
    zs, labels = probe_activations(model, corpus, size)
    return [_probe.probe_scores(z) for z in zs], labels


def probe_activations(model: nn.Module, corpus: Corpus, size: Size) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per block, the MLP activations ``[tokens, N]`` on fixed validation windows, and token features."""
    assert corpus.val_features is not None, "the corpus has no feature labels (not Python text)"
    ids, labels = _probe.probe_windows(corpus.val, corpus.val_features, count=size.probe_windows,
                                       seq_len=size.seq, seed=1234)
    return _probe.mlp_activations(model, ids), labels.reshape(-1)


# -- 1. scale ---------------------------------------------------------------------------------
def scale(corpus: Corpus, size: Size, cache: dict[str, Any]) -> dict[str, Any]:
    models: list[dict[str, Any]] = []
    for width, layers in size.scale_models:
        run = train(spec(size, "adamw", steps=size.scale_steps, width=width, layers=layers, seed=0),
                    corpus, progress=False)
        phis, labels = probe(run.model, corpus, size)
        cache.setdefault("scale_probes", []).append((width, layers, phis, labels))
        per_layer = [_probe.layer_summary(phi, labels, len(corpus.feature_names)) for phi in phis]
        models.append({
            "width": width, "layers": layers,
            "params": sum(p.numel() for p in run.model.parameters()),
            "tokens": size.scale_steps * size.batch * size.seq,
            "val_loss": run.val_loss[-1][1],
            "per_layer": per_layer,
            "mean_feature_specific_ms": statistics.fmean(x["feature_specific_ms"] for x in per_layer),
            "mean_ks": statistics.fmean(x["ks"] for x in per_layer),
            "mean_high_ms_share": statistics.fmean(x["high_ms_share"] for x in per_layer),
        })
    ms = [m["mean_feature_specific_ms"] for m in models]
    ks = [m["mean_ks"] for m in models]
    return {
        "models": models,
        "spearman_ms_vs_size": _common.spearman(list(range(len(ms))), ms),
        "spearman_ks_vs_size": _common.spearman(list(range(len(ks))), ks),
        "ms_falls_with_size": ms[-1] < ms[0],
    }


# -- 2. fkr -----------------------------------------------------------------------------------
def fkr(corpus: Corpus, size: Size, cache: dict[str, Any]) -> dict[str, Any]:
    if "scale_probes" not in cache:
        scale(corpus, size, cache)
    per_scale = []
    for width, layers, phis, labels in cache["scale_probes"]:
        curves = [_probe.fkr_curve(phi, labels, FKR_LEVELS) for phi in phis]
        mean_curve = [statistics.fmean(c[i] for c in curves) for i in range(len(FKR_LEVELS))]
        per_scale.append({
            "width": width, "layers": layers, "per_layer": curves, "mean": mean_curve,
            "chance": statistics.fmean(_probe.chance_fkr(phi, labels) for phi in phis),
            "argmin_level": FKR_LEVELS[min(range(len(FKR_LEVELS)), key=mean_curve.__getitem__)],
        })
    synthetic = _probe.planted_fkr(FKR_LEVELS, seed=0, tokens=size.planted_tokens, neurons=size.planted_neurons)
    return {"levels": FKR_LEVELS, "features": list(corpus.feature_names), "scales": per_scale, "planted": synthetic}


# -- 3. compare -------------------------------------------------------------------------------
def compare(corpus: Corpus, size: Size, cache: dict[str, Any]) -> dict[str, Any]:
    names = cache.get("variants", list(VARIANTS))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for seed in size.seeds:  # seed-major: every variant of a seed runs close together in time
        for name in names:
            method, options = {**VARIANTS, **EXTRA_VARIANTS}[name]
            if options.get("statistics") == "per-position":  # one row per position of the windows
                options = {**options, "max_positions": size.seq}
            config = None if method == "adamw" else L2EConfig(inhibition=method, warmup_steps=size.warmup_steps, **options)
            run = train(spec(size, method, steps=size.compare_steps, width=size.compare_width,
                             layers=size.compare_layers, seed=seed, l2e=config), corpus, progress=False)
            runs[name].append(_run_metrics(run, corpus, size))
    control = _strength_zero_control(corpus, size, seed=size.seeds[0])
    assert control == runs["adamw"][0]["val_loss"], (
        f"L2E with strength 0 must train exactly like AdamW: val loss {control} != {runs['adamw'][0]['val_loss']}"
    )
    base_time = [r["median_step_s"] for r in runs["adamw"]]
    base_loss = [r["val_loss"] for r in runs["adamw"]]
    table: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        table[name] = {
            key: _common.mean_std([r[key] for r in rs])
            for key in ("val_loss", "feature_specific_ms", "high_ms_share", "fkr_2pct", "selected_fraction")
        }
        table[name]["val_loss_delta_vs_adamw"] = _common.mean_std([r["val_loss"] - b for r, b in zip(rs, base_loss)])
        table[name]["step_time_ratio"] = _common.mean_std([r["median_step_s"] / b for r, b in zip(rs, base_time)])
        table[name]["position_shares"] = {
            kind: _probe.mean_lists([r["position_shares"][kind] for r in rs]) for kind in rs[0]["position_shares"]
        }
    return {"steps": size.compare_steps, "width": size.compare_width, "layers": size.compare_layers,
            "seeds": list(size.seeds), "variants": table, "runs": runs,
            "checks": {"strength0_val_loss_equals_adamw": True}}


def _strength_zero_control(corpus: Corpus, size: Size, seed: int) -> float:
    """Validation loss of L2E (all blocks) with strength 0: the harness itself must not matter."""
    config = L2EConfig(strength=0.0, layers="all", warmup_steps=size.warmup_steps)
    run = train(spec(size, "l2e", steps=size.compare_steps, width=size.compare_width,
                     layers=size.compare_layers, seed=seed, l2e=config), corpus, progress=False)
    return float(run.val_loss[-1][1])


def _run_metrics(run: RunResult, corpus: Corpus, size: Size) -> dict[str, Any]:
    zs, labels = probe_activations(run.model, corpus, size)
    phis = [_probe.probe_scores(z) for z in zs]
    summaries = [_probe.layer_summary(phi, labels, len(corpus.feature_names)) for phi in phis]
    fractions = [v[-1] for v in run.selected_fraction.values()]
    return {
        "val_loss": run.val_loss[-1][1],
        "feature_specific_ms": statistics.fmean(s["feature_specific_ms"] for s in summaries),
        "high_ms_share": statistics.fmean(s["high_ms_share"] for s in summaries),
        "fkr_2pct": statistics.fmean(_probe.fkr_curve(phi, labels, [0.02])[0] for phi in phis),
        "per_layer_feature_specific_ms": [s["feature_specific_ms"] for s in summaries],
        "median_step_s": statistics.median(run.step_seconds[1:] or run.step_seconds),
        "selected_fraction": statistics.fmean(fractions) if fractions else 0.0,
        "position_shares": _probe.position_metrics(run.model, zs, size.probe_windows, run.optimizer),
    }


# -- 4. threshold -----------------------------------------------------------------------------
def threshold(corpus: Corpus, size: Size, cache: dict[str, Any]) -> dict[str, Any]:
    """Train L2E (all layers) with our own loop; before each step's commit, record tau and the
    exact (1 - ratio)-quantile of that step's scores (against the same pre-step statistics)."""
    config = L2EConfig(layers="all", warmup_steps=size.warmup_steps)
    run = setup(spec(size, "l2e", steps=size.threshold_steps, width=size.compare_width,
                     layers=size.compare_layers, seed=0, l2e=config))
    opt = run.optimizer
    assert isinstance(opt, L2EWrapper)
    modules = dict(run.model.named_modules())
    trace: dict[str, dict[str, list[float]]] = {n: {"tau": [], "quantile": [], "fraction": []} for n in opt.sites}

    def recorder(name: str) -> Any:
        site = opt.sites[name]

        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if not mod.training or int(site.count) == 0:
                return
            z = args[0].detach().reshape(-1, args[0].shape[-1])
            phi = monosemanticity_scores(z, site.mean, site.var, eps=config.eps).flatten()
            k = max(1, math.ceil(config.ratio * phi.numel()))
            trace[name]["quantile"].append(float(torch.topk(phi, k).values[-1]))
            trace[name]["tau"].append(float(site.threshold))
            trace[name]["fraction"].append(float((phi >= site.threshold).float().mean()))

        return hook

    handles = [modules[n].register_forward_pre_hook(recorder(n)) for n in opt.sites]
    windows = batches(corpus.train, batch_size=size.batch, seq_len=size.seq, seed=0)
    for _ in range(size.threshold_steps):
        torch.autograd.backward(lm_loss(run.model, next(windows)))
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
        opt.step()
        run.scheduler.step()
        opt.zero_grad(set_to_none=True)
    for handle in handles:
        handle.remove()
    summary = {}
    for name, t in trace.items():
        half = len(t["tau"]) // 2
        logs = [math.log(a / b) for a, b in zip(t["tau"][half:], t["quantile"][half:]) if b > 0]
        summary[name] = {
            "median_abs_log_ratio_second_half": statistics.median(abs(x) for x in logs) if logs else float("nan"),
            "mean_log_ratio_second_half": statistics.fmean(logs) if logs else float("nan"),
            "mean_fraction_second_half": statistics.fmean(t["fraction"][half:]) if t["fraction"][half:] else 0.0,
            "mean_quantile_second_half": statistics.fmean(t["quantile"][half:]) if t["quantile"][half:] else 0.0,
            "final_tau": t["tau"][-1] if t["tau"] else float(opt.sites[name].threshold),
        }
    return {"ratio": config.ratio, "threshold_lr": config.threshold_lr, "steps": size.threshold_steps,
            "sites": summary, "trace": trace}


RUNNERS = {"scale": scale, "fkr": fkr, "compare": compare, "threshold": threshold}
#: The committed results and figures (full runs only) and where quick runs write by default.
RESULTS, FIGURES, QUICK_FOLDER = "docs/results", "docs/figures", "runs/reproduce-quick"


def main(argv: list[str] | None = None) -> None:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["scaling"]:  # the scaling study has its own options and a resumable runner
        from . import scaling as scaling_study

        scaling_study.main(args_in[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="+", choices=(*EXPERIMENTS, "all"),
                        help="one or more experiments (fkr reuses the scale models when both run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI (seconds)")
    parser.add_argument("--out", default=None, help=f"results folder (default {RESULTS}; --quick: {QUICK_FOLDER})")
    parser.add_argument("--figures", default=None, help=f"figures folder (default {FIGURES}; --quick: the results folder)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data", choices=DATA_NAMES, default="code",
                        help="corpus: code (stdlib Python, tokenize features; the default), english (its "
                             "docstrings, comments and pydoc topics; 9 byte classes) or mixed (prose vs code)")
    parser.add_argument("--scale-steps", type=int, default=None, help="override the scale models' steps")
    parser.add_argument("--compare-steps", type=int, default=None, help="override the compare runs' steps")
    parser.add_argument("--variants", nargs="+", choices=(*VARIANTS, *EXTRA_VARIANTS), default=None,
                        help="compare only these variants (default: all; adamw is always included)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    if args.scale_steps:
        size = dataclasses.replace(size, scale_steps=args.scale_steps)
    if args.compare_steps:
        size = dataclasses.replace(size, compare_steps=args.compare_steps)
    cache: dict[str, Any] = {"variants": ["adamw", *(v for v in args.variants or VARIANTS if v != "adamw")]}
    out = pathlib.Path(args.out or (QUICK_FOLDER if args.quick else RESULTS))
    figures = pathlib.Path(args.figures or (out if args.quick else FIGURES))
    out.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    corpus = load_named(args.data, max_bytes=size.corpus_bytes)
    names = EXPERIMENTS if "all" in args.experiment else tuple(dict.fromkeys(args.experiment))
    for name in names:
        start, start_cpu = time.perf_counter(), time.process_time()
        result = RUNNERS[name](corpus, size, cache)
        result.update(
            experiment=name, quick=args.quick, size=dataclasses.asdict(size), data=args.data,
            wall_s=time.perf_counter() - start, cpu_s=time.process_time() - start_cpu,
            machine=_common.machine(), command="python -m benchmarks.reproduce " + " ".join(argv if argv is not None else sys.argv[1:]),
        )
        path = out / f"{name}.json"
        path.write_text(json.dumps(result, indent=1, sort_keys=True, allow_nan=True))
        _figures.draw(name, result, figures / f"{name}.png")
        print(f"{name}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU -> {path}", flush=True)
        print(_figures.summary(name, result), flush=True)


if __name__ == "__main__":
    main()
