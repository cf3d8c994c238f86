"""The step-time commit: sites committed together in shape groups, each as if alone."""

from __future__ import annotations

import copy

import torch

from l2e_optim import L2EConfig
from l2e_optim._src.commit import commit_sites
from l2e_optim._src.site import SiteState

SHAPES = [(8, None), (8, None), (16, None), (8, None), (8, 4), (8, 4), (16, 3)]  # (neurons, rows)


def sites_with_pending_sums(seed: int = 0) -> list[SiteState]:
    """Sites of three shapes (interleaved), with running statistics and a step's sums pending;
    one site has no statistics yet, one saw no token this step, one skipped a micro-batch."""
    g = torch.Generator().manual_seed(seed)
    sites = []
    for i, (n, rows) in enumerate(SHAPES):
        site = SiteState(f"site{i}", n, threshold=4.0, device=torch.device("cpu"), rows=rows)
        shape = site.mean.shape
        if i != 1:
            site.mean.copy_(torch.randn(shape, generator=g))
            site.var.copy_(torch.rand(shape, generator=g) + 0.1)
            site.count.copy_(torch.randint(2, 500, site.count.shape, generator=g))
            site.threshold.fill_(float(torch.rand((), generator=g) * 8 + 1))
        acc = site.pending()
        tokens = torch.randint(1, 64, acc.tokens.shape, generator=g).float() if i != 3 else acc.tokens.zero_()
        acc.tokens.copy_(tokens)
        d = torch.randn((int(tokens.max()),) + shape, generator=g)
        acc.s1.copy_(d.sum(0))
        acc.s2.copy_((d * d).sum(0))
        acc.selected.fill_(float(torch.randint(0, 20, (), generator=g)) if i != 3 else 0.0)
        acc.nonfinite.fill_(1.0 if i == 5 else 0.0)
        sites.append(site)
    return sites


def everything(site: SiteState) -> list[torch.Tensor]:
    return [*site.tensors().values(), site.accumulator]


def test_each_site_commits_as_if_alone() -> None:
    config = L2EConfig(ratio=0.05)
    together = sites_with_pending_sums()
    alone = copy.deepcopy(together)
    before = copy.deepcopy(together)
    commit_sites(together, config)
    for site in alone:
        commit_sites([site], config)
    for a, b, old in zip(together, alone, before):
        for x, y in zip(everything(a), everything(b)):
            assert torch.equal(x, y), a.name
        assert int(a.count.sum()) == int(old.count.sum()) + int(old.pending().tokens.sum())
        assert torch.count_nonzero(a.accumulator) == 0
    moved = [not torch.equal(a.threshold, old.threshold) for a, old in zip(together, before)]
    assert moved == [True, False, True, False, True, True, True]  # site1: no statistics; site3: no token
    assert [int(a.nonfinite) for a in together] == [0, 0, 0, 0, 0, 1, 0]
