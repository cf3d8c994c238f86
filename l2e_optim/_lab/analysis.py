"""The paper's monosemanticity analysis of a trained causal LM, on byte tokens.

Activations are read at every block's MLP down-projection input (the same site L2E inhibits), in
eval mode over contiguous validation windows. Scores use the statistics of those same tokens
(mean and unbiased variance per neuron, MEmeL's eps compensation): ``phi = (z - mean)^2 / S^2``.

Project definitions (the paper does not fix them; see docs/demo.md):

* *neuron MS*: the mean of a neuron's highest ``TOP_FRACTION`` token scores. A Gaussian neuron
  scores :func:`gaussian_neuron_ms` (about 8.4 for the top 1%); a neuron that sits still and fires
  rarely scores far higher.
* *high-MS neuron*: neuron MS above ``HIGH_MS_FACTOR`` times the Gaussian value.
* *K-S statistic*: two-sample Kolmogorov-Smirnov distance between the token scores of one feature
  (e.g. comments) and the token scores of all tokens, per layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from .corpus import DataError
from .python_features import FEATURE_NAMES
from .._src.discovery import discover_sites
from .._src.metrics import false_killing_rate, position_shares
from .._src.selection import monosemanticity_scores

TOP_FRACTION = 0.01
HIGH_MS_FACTOR = 2.0  # twice a Gaussian neuron's score: clearly heavier-tailed than noise
FKR_RATIOS: tuple[float, ...] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
EPS = 0.01  # MEmeL's variance compensation, as in L2EConfig's default
POSITION_FIRST = 4  # leading positions that get their own share in the position diagnostic
POSITION_RATIO = 0.02  # the share of values the position diagnostic selects (L2E's default ratio)


def gaussian_neuron_ms(top_fraction: float = TOP_FRACTION) -> float:
    """Neuron MS of a Gaussian neuron: ``E[Z^2 | |Z| > c]`` with ``P(|Z| > c) = top_fraction``."""
    c = float(torch.special.ndtri(torch.tensor(1.0 - top_fraction / 2.0, dtype=torch.float64)))
    density = math.exp(-0.5 * c * c) / math.sqrt(2.0 * math.pi)
    return 1.0 + 2.0 * c * density / top_fraction


def ks_statistic(a: Tensor, b: Tensor) -> Tensor:
    """Two-sample Kolmogorov-Smirnov statistic ``sup_x |F_a(x) - F_b(x)|`` (0-dim float64).

    Both empirical CDFs are evaluated at every observed value (where the supremum is reached).
    """
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("ks_statistic needs two non-empty samples.")
    a_sorted = torch.sort(a.flatten().to(torch.float64)).values
    b_sorted = torch.sort(b.flatten().to(torch.float64)).values
    points = torch.cat([a_sorted, b_sorted])
    cdf_a = torch.searchsorted(a_sorted, points, right=True).to(torch.float64) / a_sorted.numel()
    cdf_b = torch.searchsorted(b_sorted, points, right=True).to(torch.float64) / b_sorted.numel()
    return (cdf_a - cdf_b).abs().max()


def neuron_ms(scores: Tensor, top_fraction: float = TOP_FRACTION) -> Tensor:
    """``[N]`` neuron MS: the mean of each neuron's top ``top_fraction`` token scores."""
    k = max(1, math.ceil(top_fraction * scores.shape[0]))
    return torch.topk(scores, k, dim=0).values.mean(0)


def layer_scores(z: Tensor, eps: float = EPS) -> Tensor:
    """``[tokens, N]`` scores of ``z`` against the statistics of ``z`` itself."""
    z = z.to(torch.float32)
    mean = z.mean(0)
    var = z.var(0, unbiased=True) if z.shape[0] > 1 else torch.zeros_like(mean)
    return monosemanticity_scores(z, mean, var, eps=eps)


@torch.no_grad()
def collect_activations(
    model: nn.Module, windows: Tensor, sites: Sequence[str], *, device: str = "cpu"
) -> dict[str, Tensor]:
    """Each site's input activation over ``windows`` (``[n, seq]`` token ids), as ``[tokens, N]``.

    Runs in eval mode (an attached L2EWrapper does nothing there); rows follow ``windows``
    flattened in order.
    """
    modules = dict(model.named_modules())
    captured: dict[str, list[Tensor]] = {name: [] for name in sites}
    handles = []
    for name in sites:

        def grab(_: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            captured[name].append(rearrange(args[0].detach().float().cpu(), "... n -> (...) n"))

        handles.append(modules[name].register_forward_pre_hook(grab))
    was_training = model.training
    model.eval()
    try:
        for window in windows:
            model(input_ids=window[None].to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in captured.items()}


def position_selection(
    z: Tensor, *, ratio: float = POSITION_RATIO, first: int = POSITION_FIRST, eps: float = EPS
) -> dict[str, list[float]] | None:
    """Where the top ``ratio`` of the values sit by position, under pooled and per-position statistics.

    ``z`` is ``[windows, seq, N]``. Each value is scored against the statistics of ``z`` itself,
    once pooled per neuron (as :func:`layer_scores`) and once per (position, neuron); the values
    with the highest ``ratio`` of scores are selected, and :func:`position_shares` says which share
    of them sits at each of the ``first`` leading positions and at all later ones. Returns None with
    fewer than two windows (no per-position variance).
    """
    if z.shape[0] < 2:
        return None
    z = z.float()
    pooled = layer_scores(rearrange(z, "w t n -> (w t) n"), eps).reshape(z.shape)
    per_position = monosemanticity_scores(z, z.mean(0), z.var(0, unbiased=True), eps=eps)
    return {"pooled": _top_shares(pooled, ratio, first), "per_position": _top_shares(per_position, ratio, first)}


def _top_shares(phi: Tensor, ratio: float, first: int) -> list[float]:
    k = max(1, math.ceil(ratio * phi.numel()))
    kth = torch.topk(phi.flatten(), k).values[-1]
    return [float(x) for x in position_shares(phi >= kth, first)]


def analysis_windows(tokens: Tensor, *, seq_len: int, max_tokens: int) -> Tensor:
    """Contiguous, non-overlapping ``[n, seq_len]`` windows from the start of ``tokens``."""
    n = min(tokens.numel(), max_tokens) // seq_len
    if n < 1:
        raise DataError(
            f"{tokens.numel()} validation tokens are fewer than one analysis window of {seq_len}; "
            "give more text or a shorter window."
        )
    return tokens[: n * seq_len].reshape(n, seq_len)


@dataclasses.dataclass
class Analysis:
    """What :func:`analyze` measured (``to_dict`` gives the JSON form)."""

    tokens: int
    sites: list[str]
    layers: list[dict[str, Any]]
    neuron_scores: dict[str, list[float]]
    top_neurons: list[dict[str, Any]]
    fkr: dict[str, Any] | None
    ks: dict[str, Any] | None
    positions: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (neuron scores included, for plots)."""
        return dataclasses.asdict(self)

    def high_ms_share(self, sites: Sequence[str] | None = None) -> float:
        """Share of high-MS neurons over ``sites`` (default: all)."""
        chosen = [layer for layer in self.layers if sites is None or layer["site"] in sites]
        neurons = sum(float(layer["neurons"]) for layer in chosen)
        high = sum(float(layer["high_ms_share"]) * float(layer["neurons"]) for layer in chosen)
        return high / max(neurons, 1.0)

    def fkr_at(self, ratio: float, sites: Sequence[str] | None = None) -> float | None:
        """Mean FKR over ``sites`` (default: all) at a measured inhibition level, or None."""
        if self.fkr is None or ratio not in self.fkr["ratios"]:
            return None
        index = self.fkr["ratios"].index(ratio)
        values = [v[index] for name, v in self.fkr["per_site"].items() if sites is None or name in sites]
        return sum(values) / len(values) if values else None


def analyze(
    model: nn.Module,
    tokens: Tensor,
    features: Tensor | None,
    *,
    seq_len: int = 128,
    max_tokens: int = 8192,
    top_neurons: int = 8,
    device: str = "cpu",
    render: Callable[[Tensor, int], str] | None = None,
    feature_names: Sequence[str] = FEATURE_NAMES,
) -> Analysis:
    """Per-layer MS, the most monosemantic neurons with their byte contexts, FKR, K-S, and where
    the top 2% of values sit by position under pooled and per-position statistics.

    Args:
        model: a causal LM taking ``input_ids`` (byte token ids here).
        tokens: ``[bytes]`` int64 text to analyse (the validation split).
        features: ``[bytes]`` feature labels (:data:`FEATURE_NAMES`), or None: FKR and K-S
            are then not available.
        seq_len, max_tokens: window length and the number of tokens analysed.
        top_neurons: how many of the most monosemantic neurons to list.
        render: ``render(tokens, position)`` -> the text around a token, the token in brackets
            (default :func:`byte_context`; a tokenizer's decoder for sub-word models).
        feature_names: what each label means (``Corpus.feature_names``; Python's by default).
    """
    sites = discover_sites(model, "all")
    windows = analysis_windows(tokens, seq_len=seq_len, max_tokens=max_tokens)
    used = tokens[: windows.numel()]
    labels = None if features is None else features[: windows.numel()]
    acts = collect_activations(model, windows, sites, device=device)
    layers: list[dict[str, Any]] = []
    per_neuron: dict[str, Tensor] = {}
    high_cut = HIGH_MS_FACTOR * gaussian_neuron_ms()
    fkr: dict[str, list[float]] = {}
    ks: dict[str, dict[str, float]] = {}
    tops: list[tuple[float, str, int, Tensor]] = []
    positions: dict[str, dict[str, list[float]]] = {}
    for index, name in enumerate(sites):
        by_position = position_selection(acts[name].reshape(*windows.shape, -1))
        if by_position is not None:
            positions[name] = by_position
        phi = layer_scores(acts[name])  # [tokens, N]
        scores = neuron_ms(phi)
        per_neuron[name] = scores
        layers.append(_layer_row(name, index, phi, scores, high_cut))
        best = torch.topk(scores, min(top_neurons, scores.numel()))
        tops.extend((float(v), name, int(j), phi[:, int(j)]) for v, j in zip(best.values, best.indices))
        if labels is not None:
            fkr[name] = [float(false_killing_rate(phi, labels, ratio=r)) for r in FKR_RATIOS]
            ks[name] = _ks_by_feature(phi, labels, feature_names)
    tops.sort(key=lambda item: -item[0])
    return Analysis(
        tokens=int(used.numel()),
        sites=list(sites),
        layers=layers,
        neuron_scores={name: s.tolist() for name, s in per_neuron.items()},
        top_neurons=[
            _neuron_examples(s, name, j, col, used, labels, render or byte_context, feature_names)
            for s, name, j, col in tops[:top_neurons]
        ],
        fkr=None if labels is None else {"ratios": list(FKR_RATIOS), "per_site": fkr, "mean": _column_means(fkr)},
        ks=None if labels is None else {"per_site": ks, "mean": _feature_means(ks, feature_names)},
        positions=None if not positions else {
            "first": POSITION_FIRST, "ratio": POSITION_RATIO, "per_site": positions,
            "mean": {kind: _column_means({n: p[kind] for n, p in positions.items()})
                     for kind in ("pooled", "per_position")},
        },
    )


def _layer_row(name: str, index: int, phi: Tensor, scores: Tensor, high_cut: float) -> dict[str, Any]:
    return {
        "site": name,
        "layer": index,
        "neurons": int(scores.numel()),
        "mean_ms": float(phi.mean()),
        "median_neuron_ms": float(scores.median()),
        "max_neuron_ms": float(scores.max()),
        "high_ms_share": float((scores > high_cut).float().mean()),
    }


def _ks_by_feature(phi: Tensor, labels: Tensor, feature_names: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for index, feature in enumerate(feature_names):
        rows = labels == index
        if bool(rows.any()):
            out[feature] = float(ks_statistic(phi[rows], phi))
    return out


def _neuron_examples(
    score: float,
    site: str,
    neuron: int,
    column: Tensor,
    used: Tensor,
    labels: Tensor | None,
    render: Callable[[Tensor, int], str],
    feature_names: Sequence[str],
    k: int = 3,
) -> dict[str, Any]:
    """A neuron and the byte contexts of its ``k`` highest-scoring tokens."""
    examples = []
    for value, position in zip(*torch.topk(column, min(k, column.numel()))):
        p = int(position)
        examples.append(
            {
                "ms": float(value),
                "context": render(used, p),
                "feature": None if labels is None else feature_names[int(labels[p])],
            }
        )
    return {"site": site, "neuron": neuron, "neuron_ms": score, "examples": examples}


def byte_context(tokens: Tensor, position: int, before: int = 20, after: int = 8) -> str:
    """The text around byte ``position`` with that byte in brackets, e.g. ``"def fo[o](x)"``."""

    def text(lo: int, hi: int) -> str:
        raw = bytes(tokens[max(0, lo) : max(0, hi)].tolist()).decode("utf-8", errors="replace")
        return raw.replace("\n", "\\n").replace("\t", "\\t")

    return f"{text(position - before, position)}[{text(position, position + 1)}]{text(position + 1, position + 1 + after)}"


def _column_means(per_site: dict[str, list[float]]) -> list[float]:
    rows = list(per_site.values())
    return [sum(col) / len(col) for col in zip(*rows)] if rows else []


def _feature_means(per_site: dict[str, dict[str, float]], feature_names: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for feature in feature_names:
        values = [d[feature] for d in per_site.values() if feature in d]
        if values:
            out[feature] = sum(values) / len(values)
    return out

