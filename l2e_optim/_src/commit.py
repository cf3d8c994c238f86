"""The step-time commit of one site: merge the step's sums, move the threshold. No host sync."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .config import L2EConfig
from .site import SiteState
from .selection import update_threshold
from .statistics import MIN_COUNT, merge_moments, moments_from_sums


@torch.no_grad()
def commit_site(site: SiteState, config: L2EConfig) -> None:
    """Fold ``site.accumulator`` into the running state in place, then clear it.

    Pooled and per-position statistics take the same path: per-position rows are merged row by
    row (each with its own token count), and the threshold, one per site, sees all rows' values.
    """
    acc = site.pending()
    # Column vectors: a per-row count [R] meets its row's [R, N]; pooled 0-dim counts become [1].
    tokens = acc.tokens.unsqueeze(-1)
    batch_mean, batch_var = moments_from_sums(tokens, acc.s1, acc.s2, site.mean)
    # Only scores taken against existing statistics say anything about the threshold.
    scored = torch.where(site.count >= MIN_COUNT, acc.tokens * site.neurons, torch.zeros_like(acc.tokens)).sum()
    new_tau = update_threshold(site.threshold, acc.selected, scored, config.ratio, config.threshold_lr)
    fraction = torch.where(scored > 0, acc.selected / scored.clamp_min(1.0), site.selected_fraction)
    new_mean, new_var = merge_moments(
        site.count.unsqueeze(-1), site.mean, site.var, tokens, batch_mean, batch_var, config.forget_steps
    )
    site.mean.copy_(new_mean)
    site.var.copy_(new_var)
    site.threshold.copy_(new_tau)
    site.selected_fraction.copy_(fraction)
    site.count.add_(acc.tokens.round().to(torch.int64))
    site.nonfinite.add_(acc.nonfinite.round().to(torch.int64))
    site.accumulator.zero_()


def step_increment(sites: Iterable[SiteState], param_groups: Sequence[Mapping[str, Any]]) -> Tensor | int:
    """What a step adds to the wrapper's step count: 1, or 0 for a step that did no training.

    ``torch.distributed.checkpoint`` (``_init_optim_state``) and torchtitan (``init_optim_state``)
    create a lazy optimizer's state by stepping it with learning rate 0 and a zero gradient on
    every trainable parameter, without any forward. That step must leave the L2E state as it
    was: the statistics and threshold already do (no tokens were gathered); the step count is
    kept here. Only that pattern is tested (lr 0 everywhere, every gradient set), host-side
    first; then whether any micro-batch reached a site, on the device (no sync). A real step at
    lr 0 (warm-up) has seen tokens and counts.
    """
    groups = list(param_groups)
    if any(not isinstance(group.get("lr"), Tensor) and group.get("lr") != 0 for group in groups):
        return 1
    if any(p.grad is None for group in groups for p in group["params"] if p.requires_grad):
        return 1
    pending = [site.pending() for site in sites]
    if not pending:
        return 1
    # Tokens and skipped non-finite micro-batches: anything at all that reached a site.
    reached = torch.stack([acc.tokens.sum() + acc.nonfinite for acc in pending]).sum()
    return (reached > 0).to(torch.int64)
