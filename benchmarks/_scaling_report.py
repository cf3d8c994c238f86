"""The scaling study's report, from whatever runs have finished: summary JSON, figure, tables.

Differences are paired by seed: "d loss" of an arm is its validation loss minus AdamW's with the
same seed (same initial weights, same data windows), over the seeds where both runs finished;
"mono-specific" is L2E's minus the random control's, the part of L2E's gain that selecting
*monosemantic* values adds over penalising any values. Means +- sample standard deviations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
from typing import Any

from . import _common
from ._scaling_run import Plan, jobs

METRICS = ("val_loss", "feature_specific_ms", "ks", "high_ms_share", "fkr_2pct")
LOSS_ARMS = ("l2e", "random", "memel")
#: One colour and a small horizontal offset per arm, the same in every panel (bars do not overlap).
STYLE = {"adamw": ("gray", 0.94), "l2e": ("C0", 0.97), "random": ("C1", 1.0), "memel": ("C2", 1.03),
         "L2E - random": ("k", 1.0)}


def load_runs(out: pathlib.Path) -> dict[str, dict[str, Any]]:
    """Every finished run's result under ``out/runs``, by run name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


def _paired(runs: dict[str, dict[str, Any]], job_of: Any, a: str, b: str, seeds: tuple[int, ...]) -> list[float]:
    pairs = [(runs.get(job_of(s, a)), runs.get(job_of(s, b))) for s in seeds]
    return [x["val_loss"] - y["val_loss"] for x, y in pairs if x is not None and y is not None]


def _size_summary(runs: dict[str, dict[str, Any]], plan: Plan, corpus: str, width: int, layers: int) -> dict[str, Any]:
    def name(seed: int, arm: str) -> str:
        return f"{corpus}_w{width}x{layers}_s{seed}_{arm}"

    found = [runs[name(s, a)] for s in plan.seeds for a in plan.arms if name(s, a) in runs]
    arms: dict[str, Any] = {}
    for arm in plan.arms:
        rs = [runs[name(s, arm)] for s in plan.seeds if name(s, arm) in runs]
        arms[arm] = {m: _common.mean_std([r[m] for r in rs]) for m in METRICS}
        arms[arm]["d_loss_vs_adamw"] = _common.mean_std(_paired(runs, name, arm, "adamw", plan.seeds))
        shares = [r["position_shares"] for r in rs if "position_shares" in r]
        arms[arm]["position_shares"] = [statistics.fmean(col) for col in zip(*shares)] if shares else None
        arms[arm]["seeds"] = [r["seed"] for r in rs]
    return {
        "width": width, "layers": layers,
        "params": found[0]["params"] if found else None,
        "non_embedding_params": found[0]["non_embedding_params"] if found else None,
        "tokens": found[0]["tokens"] if found else None,
        "complete_seeds": [s for s in plan.seeds if all(name(s, a) in runs for a in plan.arms)],
        "arms": arms,
        "monosemantic_specific": _common.mean_std(_paired(runs, name, "l2e", "random", plan.seeds)),
    }


def build(plan: Plan, out: pathlib.Path, *, command: str, quick: bool) -> dict[str, Any]:
    """The summary of every finished run of ``plan`` under ``out``."""
    runs = load_runs(out)
    planned = [j.name for j in jobs(plan)]
    corpora: dict[str, Any] = {}
    for corpus in plan.corpora:
        sizes = [_size_summary(runs, plan, corpus, w, layers) for w, layers in plan.sizes]
        done = [s for s in sizes if s["monosemantic_specific"]["n"] >= 2]
        corpora[corpus] = {
            "sizes": sizes,
            "spearman_mono_specific_vs_params": _common.spearman(
                [s["non_embedding_params"] for s in done], [s["monosemantic_specific"]["mean"] for s in done]),
            "spearman_l2e_gain_vs_params": _common.spearman(
                [s["non_embedding_params"] for s in done], [s["arms"]["l2e"]["d_loss_vs_adamw"]["mean"] for s in done]),
        }
    finished = [n for n in planned if n in runs]
    return {
        "experiment": "scaling", "quick": quick, "command": command, "machine": _common.machine(),
        "plan": dataclasses.asdict(plan), "arms": list(plan.arms), "corpora": corpora,
        "runs_planned": len(planned), "runs_finished": len(finished),
        "missing": [n for n in planned if n not in runs],
        "cpu_s_finished_runs": sum(runs[n]["cpu_s"] for n in finished),
    }


def write(summary: dict[str, Any], results: pathlib.Path, figures: pathlib.Path) -> list[pathlib.Path]:
    """``scaling.json`` and ``scaling.md`` in ``results``, ``scaling.png`` in ``figures``."""
    results.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    paths = [results / "scaling.json", results / "scaling.md", figures / "scaling.png"]
    paths[0].write_text(json.dumps(summary, indent=1, sort_keys=True))
    paths[1].write_text(markdown(summary) + "\n")
    figure(summary, paths[2])
    return paths


#: A page section between these two lines is the report's tables (``--section``), rewritten in place.
BEGIN, END = "<!-- scaling report: begin (generated) -->", "<!-- scaling report: end -->"


def update_section(page: pathlib.Path, summary: dict[str, Any]) -> None:
    """Replace the text between :data:`BEGIN` and :data:`END` in ``page`` with the tables.

    Raises:
        ValueError: the page lacks the two marker lines (the message names them); nothing written.
    """
    text = page.read_text()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{page} has no '{BEGIN}' ... '{END}' lines; add them where the tables go.")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    page.write_text(f"{head}{BEGIN}\n{markdown(summary)}\n{END}{tail}")


def _pm(x: dict[str, Any], digits: int = 4) -> str:
    if x["mean"] is None:
        return "-"
    return f"{x['mean']:+.{digits}f} +- {x['std']:.{digits}f}" if x["n"] > 1 else f"{x['mean']:+.{digits}f} (1 seed)"


def _num(x: dict[str, Any], digits: int = 3) -> str:
    return "-" if x["mean"] is None else f"{x['mean']:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    """Per corpus: a loss table and a monosemanticity table, one row per model size."""
    lines = [f"Finished {summary['runs_finished']} of {summary['runs_planned']} runs; "
             f"CPU time of the finished runs {summary['cpu_s_finished_runs'] / 3600:.2f} h."]
    for corpus, c in summary["corpora"].items():
        lines += ["", f"**{corpus}**: validation loss, and its paired difference (mean +- std over seeds)", "",
                  "| model | non-emb. params | seeds | AdamW val loss | L2E - AdamW | random - AdamW | MEmeL - AdamW "
                  "| **L2E - random** |", "|---|---|---|---|---|---|---|---|"]
        for s in c["sizes"]:
            a = s["arms"]
            params = "-" if s["non_embedding_params"] is None else f"{s['non_embedding_params']:,}"
            lines.append(f"| {s['width']} x {s['layers']} | {params} | "
                         f"{len(s['complete_seeds'])} | {_num(a['adamw']['val_loss'], 4)} | "
                         + " | ".join(_pm(a[x]["d_loss_vs_adamw"]) for x in LOSS_ARMS)
                         + f" | **{_pm(s['monosemantic_specific'])}** |")
        lines += ["", f"**{corpus}**: monosemanticity of the trained models (mean over layers and seeds; "
                  "AdamW / L2E / random / MEmeL), and the share of the probe's selection at the first "
                  "positions (each run's own rule and final statistics, inhibited layers)", "",
                  "| model | feature-specific MS | K-S | FKR at 2% | pos. 0 share (L2E / random / MEmeL) "
                  "| pos. 0-3 share |", "|---|---|---|---|---|---|"]
        for s in c["sizes"]:
            a = s["arms"]
            cells = [" / ".join(_num(a[x][m], 2 if m == "feature_specific_ms" else 3) for x in summary["arms"])
                     for m in ("feature_specific_ms", "ks", "fkr_2pct")]
            cells += [" / ".join("-" if a[x]["position_shares"] is None else f"{sum(a[x]['position_shares'][:n]):.3f}"
                                 for x in LOSS_ARMS) for n in (1, -1)]  # [:-1]: every first position, not the rest
            lines.append(f"| {s['width']} x {s['layers']} | " + " | ".join(cells) + " |")
        rho = c["spearman_mono_specific_vs_params"]
        lines += ["", f"Spearman(params, L2E - random) on {corpus}: "
                  + ("n/a (fewer than 3 sizes with 2+ seeds)" if rho is None else f"{rho:+.2f}")]
    return "\n".join(lines)


def figure(summary: dict[str, Any], path: pathlib.Path) -> None:
    """Rows: loss gain vs AdamW per arm; L2E - random; feature-specific MS. Columns: corpora."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    corpora = list(summary["corpora"])
    ticks = sorted({s["non_embedding_params"] for c in summary["corpora"].values() for s in c["sizes"]
                    if s["non_embedding_params"]})
    # One x axis for every panel: a size finished for one arm or corpus only does not shift it.
    fig, axes = plt.subplots(3, len(corpora), figsize=(5.5 * len(corpora), 10), squeeze=False, sharex="all")
    for col, corpus in enumerate(corpora):
        sizes = [s for s in summary["corpora"][corpus]["sizes"] if s["non_embedding_params"]]
        x = [s["non_embedding_params"] for s in sizes]
        for arm in LOSS_ARMS:
            _errorbar(axes[0][col], x, [s["arms"][arm]["d_loss_vs_adamw"] for s in sizes], arm)
        _errorbar(axes[1][col], x, [s["monosemantic_specific"] for s in sizes], "L2E - random")
        for arm in summary["arms"]:
            _errorbar(axes[2][col], x, [s["arms"][arm]["feature_specific_ms"] for s in sizes], arm)
        titles = (f"{corpus}: val loss - AdamW (paired by seed)", f"{corpus}: monosemantic-specific gain",
                  f"{corpus}: feature-specific MS")
        for ax, title in zip((axes[0][col], axes[1][col], axes[2][col]), titles):
            ax.set(xscale="log", xlabel="non-embedding parameters", title=title)
            ax.xaxis.set_minor_formatter(NullFormatter())  # label the model sizes, not the decades
            ax.set_xticks(ticks, [f"{t / 1e6:.1f}M" if t >= 1e6 else f"{t / 1e3:.0f}k" for t in ticks])
            ax.axhline(0.0, color="gray", lw=0.6) if ax is not axes[2][col] else None
            ax.legend(fontsize=7)
    fig.suptitle(f"{summary['runs_finished']}/{summary['runs_planned']} runs finished; error bars: std over seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _errorbar(ax: Any, x: list[int], stats: list[dict[str, Any]], label: str) -> None:
    color, shift = STYLE[label]
    pts = [(xi, s["mean"], s["std"]) for xi, s in zip(x, stats) if s["mean"] is not None and math.isfinite(s["mean"])]
    if pts:
        ax.errorbar([p[0] * shift for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-",
                    capsize=3, label=label, color=color)
