"""The step-time commit of one site: merge the step's sums, move the threshold. No host sync."""

from __future__ import annotations

import torch

from .config import L2EConfig
from .site import ACC_NONFINITE, ACC_SELECTED, ACC_TOKENS, MIN_COUNT, SiteState
from .selection import update_threshold
from .statistics import merge_moments, moments_from_sums


@torch.no_grad()
def commit_site(site: SiteState, config: L2EConfig) -> None:
    """Fold ``site.accumulator`` into the running state in place, then clear it."""
    n = site.neurons
    acc = site.accumulator
    tokens = acc[2 * n + ACC_TOKENS]
    selected = acc[2 * n + ACC_SELECTED]
    batch_mean, batch_var = moments_from_sums(tokens, acc[:n], acc[n : 2 * n], site.mean)
    # Only scores taken against existing statistics say anything about the threshold.
    scored = torch.where(site.count >= MIN_COUNT, tokens * n, torch.zeros_like(tokens))
    new_tau = update_threshold(site.threshold, selected, scored, config.ratio, config.threshold_lr)
    fraction = torch.where(scored > 0, selected / scored.clamp_min(1.0), site.selected_fraction)
    new_mean, new_var = merge_moments(
        site.count, site.mean, site.var, tokens, batch_mean, batch_var, config.forget_steps
    )
    site.mean.copy_(new_mean)
    site.var.copy_(new_var)
    site.threshold.copy_(new_tau)
    site.selected_fraction.copy_(fraction)
    site.count.add_(tokens.round().to(torch.int64))
    site.nonfinite.add_(acc[2 * n + ACC_NONFINITE].round().to(torch.int64))
    acc.zero_()
