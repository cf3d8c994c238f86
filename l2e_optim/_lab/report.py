"""Turning demo and analysis results into a text table, a JSON file and (optionally) a PNG.

Everything here reads plain dicts (the JSON form), so the same code reports a fresh run and a
summary loaded back from disk. matplotlib is optional: without it the PNG is skipped with a note.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table (numbers formatted to 4 significant digits)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)) for r in cells)
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def demo_table(summary: dict[str, Any]) -> str:
    """The demo's end-of-run tables: one row per run, then one row per (run, site)."""
    runs = summary["runs"]
    header = ["run", "train loss", "train ppl", "val loss", "val ppl", "tokens/s", "step time / adamw",
              "high-MS share", "FKR@2%"]
    rows = [
        [
            method,
            r["train_loss"],
            r["train_ppl"],
            r["val_loss"],
            r["val_ppl"],
            r["tokens_per_second"],
            r["step_time_ratio"],
            r["high_ms_share"],
            r["fkr_2pct"],
        ]
        for method, r in runs.items()
    ]
    site_rows = [
        [f"{method}*" if method in MONITOR_ONLY else method, site, values["threshold"], values["selected_fraction"]]
        for method, r in runs.items()
        for site, values in r["sites"].items()
    ]
    parts = [format_table(header, rows)]
    if site_rows:
        parts.append(format_table(["run", "site", "final threshold", "selected fraction"], site_rows))
        parts.extend(f"* {method}: {note}." for method, note in MONITOR_ONLY.items() if runs.get(method, {}).get("sites"))
    return "\n\n".join(parts)


def analysis_table(result: dict[str, Any]) -> str:
    """Per-layer MS, FKR against inhibition level, K-S by feature, the top neurons."""
    parts = [
        format_table(
            ["layer", "site", "neurons", "mean MS", "median neuron MS", "max neuron MS", "high-MS share"],
            [[r["layer"], r["site"], r["neurons"], r["mean_ms"], r["median_neuron_ms"], r["max_neuron_ms"],
              r["high_ms_share"]] for r in result["layers"]],
        )
    ]
    fkr = result.get("fkr")
    if fkr is None:
        parts.append("FKR and K-S: not available (the text has no feature labels; they need Python sources).")
    else:
        ratios = fkr["ratios"]
        header = ["site"] + [f"FKR@{100 * r:g}%" for r in ratios]
        rows = [[name] + values for name, values in fkr["per_site"].items()] + [["mean"] + fkr["mean"]]
        parts.append(format_table(header, rows))
        ks = result["ks"]["mean"]
        parts.append(format_table(["feature", "K-S (feature vs all), mean over layers"], list(ks.items())))
    positions = result.get("positions")
    if positions is not None:
        first = positions["first"]
        header = ["site", "statistics"] + [f"pos {t}" for t in range(first)] + [f"pos >= {first}"]
        rows = [[name, kind.replace("_", "-")] + shares[kind]
                for name, shares in [*positions["per_site"].items(), ("mean", positions["mean"])]
                for kind in ("pooled", "per_position")]
        parts.append(f"Share of the top {100 * positions['ratio']:g}% of values at each position:\n"
                     + format_table(header, rows))
    neuron_rows = [
        [n["site"], n["neuron"], n["neuron_ms"], " | ".join(
            f"{e['context']}" + (f" ({e['feature']})" if e["feature"] else "") for e in n["examples"])]
        for n in result["top_neurons"]
    ]
    parts.append(format_table(["site", "neuron", "neuron MS", "top contexts ([byte] fires it)"], neuron_rows))
    return "\n\n".join(parts)


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove it is writable; raises OSError with the folder named."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".l2e-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise OSError(f"output folder {str(folder)!r} is not writable ({error.strerror or error}); "
                      "pass --out with a folder you can write to.") from error


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (temp file + rename) as indented JSON."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


#: Methods whose sites' threshold and selected fraction are tracked but not what they inhibit.
MONITOR_ONLY = {"memel": "MEmeL inhibits each sequence's top-k scores; its threshold and selected "
                         "fraction are the moving threshold's, tracked for monitoring only"}


def val_loss_gaps(curves: dict[str, Any], baseline: str = "adamw") -> dict[str, tuple[list[int], list[float]]]:
    """Each run's validation loss minus the baseline's at the same steps (the baseline excluded).

    The runs differ by a few hundredths of a nat while the loss falls by several nats, so raw
    curves drawn together hide the difference the demo exists to show.
    """
    if baseline not in curves or not curves[baseline]["val_loss"]:
        return {}
    base = dict(curves[baseline]["val_loss"])
    gaps: dict[str, tuple[list[int], list[float]]] = {}
    for method, c in curves.items():
        points = [(step, value - base[step]) for step, value in c["val_loss"] if step in base]
        if method != baseline and points:
            gaps[method] = ([p[0] for p in points], [p[1] for p in points])
    return gaps


def demo_png(path: Path, summary: dict[str, Any], curves: dict[str, Any]) -> str | None:
    """Loss curves, validation loss against AdamW's, threshold convergence and MS distributions."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed: PNG skipped (pip install matplotlib)."
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for method, c in curves.items():
        axes[0, 0].plot(range(1, len(c["train_loss"]) + 1), c["train_loss"], alpha=0.5, label=f"{method} train")
        if c["val_loss"]:
            steps, values = zip(*c["val_loss"])
            axes[0, 0].plot(steps, values, "o-", label=f"{method} val")
        monitor = method in MONITOR_ONLY
        label, style = (f"{method} (monitor only)", "--") if monitor else (method, "-")
        for site, values in c["thresholds"].items():
            axes[1, 0].plot(values, style, label=f"{label} {_short(site)}")
        for site, values in c["selected_fraction"].items():
            axes[1, 1].plot(values, style, label=f"{label} {_short(site)}")
        scores = [v for s in c["neuron_ms"].values() for v in s]
        if scores:
            axes[0, 2].hist([math.log10(max(v, 1e-6)) for v in scores], bins=40, alpha=0.5, label=method)
    for method, (gap_steps, gaps) in val_loss_gaps(curves).items():
        axes[0, 1].plot(gap_steps, gaps, "o-", label=method)
    axes[0, 1].axhline(0.0, color="grey", linewidth=0.8, label="adamw")
    axes[1, 2].axis("off")
    axes[1, 2].text(0.0, 0.5, "\n".join(f"{m}: {note}" for m, note in MONITOR_ONLY.items() if m in curves),
                    fontsize=8, wrap=True, va="center")
    titles = {(0, 0): ("loss (nats/byte)", "step"), (0, 1): ("validation loss minus AdamW's (below 0: better)", "step"),
              (0, 2): ("neuron MS distribution (log10), all layers", "log10 neuron MS"),
              (1, 0): ("threshold tau", "step"), (1, 1): ("selected fraction", "step")}
    for (row, col), (title, xlabel) in titles.items():
        ax = axes[row, col]
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if ax.lines or ax.patches:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def analysis_png(path: Path, result: dict[str, Any]) -> str | None:
    """Per-layer MS, neuron MS distributions, FKR against inhibition level, K-S by feature."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed: PNG skipped (pip install matplotlib)."
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    layers = result["layers"]
    axes[0, 0].bar([r["layer"] for r in layers], [r["median_neuron_ms"] for r in layers])
    axes[0, 0].set_title("median neuron MS per layer")
    for site, scores in result["neuron_scores"].items():
        axes[0, 1].hist([math.log10(max(v, 1e-6)) for v in scores], bins=30, alpha=0.4, label=_short(site))
    axes[0, 1].set_title("neuron MS distribution (log10) per layer")
    axes[0, 1].legend(fontsize=7)
    if result.get("fkr") is not None:
        ratios = [100 * r for r in result["fkr"]["ratios"]]
        for site, values in result["fkr"]["per_site"].items():
            axes[1, 0].plot(ratios, values, "o-", label=_short(site))
        axes[1, 0].set_xlabel("inhibited (%)")
        axes[1, 0].legend(fontsize=7)
        ks = result["ks"]["mean"]
        axes[1, 1].bar(list(ks), list(ks.values()))
        axes[1, 1].tick_params(axis="x", rotation=45)
    axes[1, 0].set_title("false killing rate vs inhibition level")
    axes[1, 1].set_title("K-S: feature vs all tokens (mean over layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def _short(site: str) -> str:
    parts = site.split(".")
    digits = [p for p in parts if p.isdigit()]
    return f"layer {digits[-1]}" if digits else site
