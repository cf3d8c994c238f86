"""Probing trained models: MLP activations on labelled text, monosemanticity, K-S, FKR, planted data.

A trained model's MS is measured against statistics of the probe set itself: each neuron's mean
and unbiased variance over all probe tokens (the "history" of a converged model), scored with
the library's ``monosemanticity_scores`` (variance compensation eps = 0.01). By construction a
neuron's MS averages about 1 over all tokens; what differs between neurons and models is how
concentrated the deviations are on one feature.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from l2e_optim import L2EWrapper, false_killing_rate, monosemanticity_scores, neuron_features, position_shares
from l2e_optim._lab.analysis import position_selection
from l2e_optim._src.discovery import discover_sites
from l2e_optim._src.selection import retrieve

#: A neuron is "high-MS" when its mean MS over the tokens of its own feature is at least this
#: many times its mean MS over all tokens (which is about 1): its deviations concentrate on it.
HIGH_MS = 3.0
#: The K-S statistic compares at most this many values per side (a fixed-seed subsample).
KS_SAMPLE = 200_000
#: Position diagnostics: leading positions that get their own share (the rest are pooled).
POSITION_FIRST = 4


def probe_windows(tokens: Tensor, features: Tensor, *, count: int, seq_len: int, seed: int) -> tuple[Tensor, Tensor]:
    """``count`` fixed windows of the validation bytes and their feature labels, ``[count, seq]``."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (count,), generator=g).tolist()
    ids = torch.stack([tokens[s : s + seq_len] for s in starts])
    labels = torch.stack([features[s : s + seq_len] for s in starts])
    return ids, labels


@torch.no_grad()
def mlp_activations(model: nn.Module, ids: Tensor, batch: int = 16) -> list[Tensor]:
    """Per block, the MLP hidden activation (the down projection's input), ``[tokens, N]`` fp32."""
    modules = dict(model.named_modules())
    names = discover_sites(model, "all")
    store: dict[str, list[Tensor]] = {name: [] for name in names}
    handles = [
        modules[name].register_forward_pre_hook(
            lambda mod, args, name=name: store[name].append(args[0].reshape(-1, args[0].shape[-1]).float())
        )
        for name in names
    ]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, ids.shape[0], batch):
            model(input_ids=ids[start : start + batch])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [torch.cat(store[name]) for name in names]


def position_metrics(model: nn.Module, zs: list[Tensor], windows: int, optimizer: object) -> dict[str, list[float]]:
    """Share of selected values at each of the first ``POSITION_FIRST`` positions, then the rest,
    averaged over layers: the top 2% of probe scores under pooled and under per-position probe
    statistics (every block), and, for a wrapped run, the method's own selection on the probe
    windows with its final statistics, threshold and retrieval (its sites)."""
    z3s = dict(zip(discover_sites(model, "all"), (z.reshape(windows, -1, z.shape[-1]) for z in zs)))
    probed = [s for s in (position_selection(z, first=POSITION_FIRST) for z in z3s.values()) if s is not None]
    out = {kind: mean_lists([s[kind] for s in probed]) for kind in ("pooled", "per_position")}
    if isinstance(optimizer, L2EWrapper):
        config = optimizer.config
        own = []
        for name, site in optimizer.sites.items():
            z3 = z3s[name.removeprefix("_orig_mod.")]
            phi = monosemanticity_scores(z3, site.mean, site.var, eps=config.eps,
                                         count=None if site.rows is None else site.count)
            picked = retrieve(phi.reshape(-1, z3.shape[-1]), config.resolved_retrieval, site.threshold,
                              config.ratio, config.memel_topk, z3.shape[0], None)
            own.append([float(x) for x in position_shares(picked.reshape(z3.shape), POSITION_FIRST)])
        out["method"] = mean_lists(own)
    return out


def mean_lists(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*rows)] if rows else []


def probe_scores(z: Tensor) -> Tensor:
    """MS of every value against the probe set's own per-neuron mean and unbiased variance."""
    return monosemanticity_scores(z, z.mean(0), z.var(0, unbiased=True))


def ks_statistic(a: Tensor, b: Tensor, seed: int = 0) -> float:
    """Two-sample Kolmogorov-Smirnov statistic ``sup |F_a - F_b|`` (subsampled to KS_SAMPLE)."""
    g = torch.Generator().manual_seed(seed)
    a, b = (_subsample(x.flatten().double(), g) for x in (a, b))
    a, b = a.sort().values, b.sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).double() / a.numel()
    fb = torch.searchsorted(b, grid, right=True).double() / b.numel()
    return float((fa - fb).abs().max())


def _subsample(x: Tensor, g: torch.Generator) -> Tensor:
    if x.numel() <= KS_SAMPLE:
        return x
    return x[torch.randperm(x.numel(), generator=g)[:KS_SAMPLE]]


def layer_summary(phi: Tensor, features: Tensor, num_features: int) -> dict[str, float]:
    """Monosemanticity of one layer: feature-specific MS, K-S to the overall MS, high-MS share."""
    lstar = neuron_features(phi, features, num_features)  # [N]
    own = features[:, None] == lstar[None, :]  # [tokens, N]: token carries the neuron's feature
    per_neuron = (phi * own).sum(0) / own.sum(0).clamp_min(1)  # [N]
    return {
        "feature_specific_ms": float(per_neuron.mean()),
        "overall_ms": float(phi.mean()),
        "ks": ks_statistic(phi[own], phi),
        "high_ms_share": float((per_neuron >= HIGH_MS * phi.mean(0)).float().mean()),
    }


def fkr_curve(phi: Tensor, features: Tensor, levels: list[float]) -> list[float]:
    """False Killing Rate at each inhibition level (the library's ``false_killing_rate``)."""
    return [float(false_killing_rate(phi, features, ratio=level)) for level in levels]


def chance_fkr(phi: Tensor, features: Tensor) -> float:
    """FKR of a selection blind to the feature: mean over neurons of 1 - share of tokens in l*_j."""
    lstar = neuron_features(phi, features)
    share = torch.bincount(features, minlength=int(lstar.max()) + 1).double() / features.numel()
    return float(1.0 - share[lstar].mean())


def planted(
    *, tokens: int, neurons: int, features: int, mono_share: float, spike_prob: float, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic activations with planted monosemantic neurons (known ground truth).

    Each token carries one of ``features`` labels (uniform). A share ``mono_share`` of the
    neurons is monosemantic for a planted feature: on tokens of that feature it fires (value
    3 to 6) with probability ``spike_prob``, else it stays near 0 (N(0, 0.3^2)). The other
    neurons are polysemantic: Student-t (3 degrees of freedom) noise on every token, so their
    occasional large values compete for selection without belonging to any feature.

    Returns ``(z [tokens, N], token features [tokens], planted feature per neuron [N], -1 for
    polysemantic)``.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, features, (tokens,), generator=g)
    truth = torch.full((neurons,), -1, dtype=torch.long)
    mono = int(round(mono_share * neurons))
    truth[:mono] = torch.randint(0, features, (mono,), generator=g)
    z = 0.3 * torch.randn(tokens, neurons, generator=g)
    fire = (labels[:, None] == truth[None, :mono]) & (torch.rand(tokens, mono, generator=g) < spike_prob)
    z[:, :mono] += fire * (3.0 + 3.0 * torch.rand(tokens, mono, generator=g))
    t3 = torch.distributions.StudentT(3.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        z[:, mono:] = t3.sample((tokens, neurons - mono))
    return z, labels, truth


def planted_fkr(levels: list[float], seed: int, tokens: int, neurons: int) -> dict[str, Any]:
    """FKR against level on planted data, the planted spike share, and how often l* is right."""
    z, labels, truth = planted(
        tokens=tokens, neurons=neurons, features=8, mono_share=0.5, spike_prob=0.32, seed=seed
    )
    phi = probe_scores(z)
    lstar = neuron_features(phi, labels, 8)
    mono = truth >= 0
    spikes = float(((labels[:, None] == truth[None, :]) & (z > 2.0)).float().mean())
    fkr = fkr_curve(phi, labels, levels)
    return {
        "levels": levels,
        "fkr": fkr,
        "argmin_level": levels[min(range(len(levels)), key=fkr.__getitem__)],
        "planted_spike_share": spikes,
        "lstar_accuracy_on_planted": float((lstar[mono] == truth[mono]).float().mean()),
        "tokens": tokens,
        "neurons": neurons,
    }
