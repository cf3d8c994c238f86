"""Figures (PNG) and text summaries of the reproduction results."""

from __future__ import annotations

import pathlib
from typing import Any

from . import _common


def draw(name: str, result: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = {"scale": _scale, "fkr": _fkr, "compare": _compare, "threshold": _threshold}[name](plt, result)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scale(plt: Any, r: dict[str, Any]) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in r["models"]:
        n = len(m["per_layer"])
        depth = [(i + 0.5) / n for i in range(n)]
        label = f"w{m['width']} x{m['layers']} ({m['params'] / 1e6:.2f}M)"
        axes[0].plot(depth, [x["feature_specific_ms"] for x in m["per_layer"]], "o-", label=label)
        axes[1].plot(depth, [x["ks"] for x in m["per_layer"]], "o-", label=label)
    axes[0].set(xlabel="relative depth of the layer", ylabel="feature-specific mean MS",
                title="Monosemanticity per layer")
    axes[1].set(xlabel="relative depth of the layer", ylabel="K-S(feature-specific, overall)",
                title="K-S statistic per layer")
    axes[0].legend(fontsize=7)
    return fig


def _fkr(plt: Any, r: dict[str, Any]) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    levels = [100 * x for x in r["levels"]]
    for s in r["scales"]:
        line = axes[0].plot(levels, s["mean"], "o-", label=f"w{s['width']} x{s['layers']} (mean)")
        axes[0].axhline(s["chance"], color=line[0].get_color(), ls=":", lw=0.8)
        for curve in s["per_layer"]:
            axes[0].plot(levels, curve, "-", color=line[0].get_color(), alpha=0.25, lw=0.8)
    axes[0].set(xscale="log", xlabel="inhibition level (%)", ylabel="FKR",
                title="FKR, tokenize features (thin: per layer; dotted: chance)")
    axes[0].legend(fontsize=7)
    p = r["planted"]
    axes[1].plot(levels, p["fkr"], "o-", color="k")
    axes[1].axvline(100 * p["planted_spike_share"], ls="--", color="gray", label="planted spike share")
    axes[1].set(xscale="log", xlabel="inhibition level (%)", ylabel="FKR",
                title="FKR, planted monosemantic neurons")
    axes[1].legend(fontsize=7)
    return fig


def _compare(plt: Any, r: dict[str, Any]) -> Any:
    names = list(r["variants"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in zip(
        axes,
        ("val_loss_delta_vs_adamw", "feature_specific_ms", "fkr_2pct"),
        ("val loss - AdamW (same seed)", "feature-specific mean MS", "FKR at 2%"),
    ):
        means = [r["variants"][n][key]["mean"] for n in names]
        stds = [r["variants"][n][key]["std"] for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=["gray"] + ["C0"] * (len(names) - 1))
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{title}\n(mean +- std over {len(r['seeds'])} seeds)", fontsize=9)
    return fig


def _threshold(plt: Any, r: dict[str, Any]) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, t) in enumerate(r["trace"].items()):
        short = name.split(".")[-3] if name.count(".") >= 2 else name
        axes[0].plot(t["quantile"], color=f"C{i}", alpha=0.35, lw=0.8)
        axes[0].plot(t["tau"], color=f"C{i}", lw=1.5, label=f"layer {short}: tau (thin: exact)")
        axes[1].plot(t["fraction"], color=f"C{i}", lw=0.8)
    axes[0].set(yscale="log", xlabel="step", ylabel="MS threshold",
                title="moving tau vs exact per-step quantile")
    axes[0].legend(fontsize=7)
    axes[1].axhline(r["ratio"], color="k", ls="--", label="target ratio")
    axes[1].set(xlabel="step", ylabel="fraction with MS >= tau", title="selected fraction")
    axes[1].legend(fontsize=7)
    return fig


def summary(name: str, r: dict[str, Any]) -> str:
    """A plain table of the experiment's headline numbers."""
    if name == "scale":
        rows = [[f"w{m['width']} x{m['layers']}", m["params"], m["val_loss"], m["mean_feature_specific_ms"],
                 m["mean_ks"], m["mean_high_ms_share"]] for m in r["models"]]
        return _common.table(["model", "params", "val loss", "feat-spec MS", "K-S", "high-MS share"], rows) + (
            f"\nSpearman(size, MS) = {r['spearman_ms_vs_size']:.2f}, Spearman(size, K-S) = {r['spearman_ks_vs_size']:.2f}")
    if name == "fkr":
        rows = [[f"w{s['width']} x{s['layers']}", *s["mean"], s["argmin_level"], s["chance"]] for s in r["scales"]]
        p = r["planted"]
        rows.append(["planted", *p["fkr"], p["argmin_level"], "-"])
        return _common.table(["model", *[f"{100 * x:g}%" for x in r["levels"]], "argmin", "chance"], rows)
    if name == "compare":
        rows = []
        for n, v in r["variants"].items():
            rows.append([n] + [f"{v[k]['mean']:.4f} +- {v[k]['std']:.4f}" for k in
                               ("val_loss", "val_loss_delta_vs_adamw", "feature_specific_ms", "high_ms_share",
                                "fkr_2pct", "step_time_ratio")])
        return _common.table(["variant", "val loss", "d loss vs AdamW", "feat-spec MS", "high-MS share",
                              "FKR 2%", "step time / AdamW"], rows)
    rows = [[n.replace("gpt_neox.layers.", "L"), s["final_tau"], s["mean_quantile_second_half"],
             s["mean_log_ratio_second_half"], s["median_abs_log_ratio_second_half"], s["mean_fraction_second_half"]]
            for n, s in r["sites"].items()]
    return _common.table(["site", "final tau", "exact q (2nd half mean)", "mean log(tau/q)",
                          "median |log(tau/q)|", "selected fraction"], rows)
