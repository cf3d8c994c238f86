"""Per-position statistics (``L2EConfig(statistics="per-position")``): the fast path against the
float64 references, where selections land by position, the threshold's ratio, checkpoints and the
no-host-sync guarantee."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import batches
from l2e_optim._lab.zoo import PlainLM, tiny_gpt_neox
from l2e_optim import (
    CheckpointError,
    L2EConfig,
    L2EWrapper,
    false_killing_rate,
    monosemanticity_scores,
    position_shares,
)
from l2e_optim._src import reference
from test_gradient import capture, lm_loss, penalised_values, site_before_and_after, warmed_up
from test_wrapper import _SyncTrap

SEQ, MAX_POSITIONS = 12, 8  # positions 8..11 share the tail row


def per_position(**kw: object) -> L2EConfig:
    return L2EConfig(statistics="per-position", max_positions=MAX_POSITIONS, **kw)  # type: ignore[arg-type]


def test_state_layout() -> None:
    model = tiny_gpt_neox(layers=2)
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.0), model, config=per_position())
    for site in opt.sites.values():
        rows = MAX_POSITIONS + 1
        assert (site.rows, site.neurons) == (rows, 128)
        assert site.mean.shape == site.var.shape == (rows, 128) and site.count.shape == (rows,)
        assert site.accumulator.numel() == 2 * rows * 128 + rows + 2
    opt.remove_hooks()
    pooled = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.0), model)
    assert next(iter(pooled.sites.values())).rows is None


@pytest.mark.parametrize("forget", [None, 2])
def test_per_position_statistics_match_reference_merge(corpus: torch.Tensor, forget: int | None) -> None:
    model = tiny_gpt_neox(layers=2)
    opt = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), model,
                     config=per_position(inhibition="none", forget_steps=forget))
    names = list(opt.sites)
    seen, _ = capture(model, names)
    data = batches(corpus, 3, SEQ)
    rows = MAX_POSITIONS + 1
    ref = {name: ([0.0] * rows, [[0.0] * 128] * rows, [[0.0] * 128] * rows) for name in names}
    mask = torch.ones(3, SEQ)
    mask[1, 4:] = 0  # padding: rows 4.. get fewer tokens than rows 0..3
    for step in range(4):
        valid = mask if step % 2 else None
        opt.set_token_mask(valid)
        lm_loss(model, next(data)).backward()
        opt.step()
        opt.zero_grad()
        for name in names:
            ref[name] = reference.merge_per_position(*ref[name], seen[name].pop().detach(), valid, forget)
    for name, site in opt.sites.items():
        count, mean, var = ref[name]
        assert site.count.tolist() == count
        torch.testing.assert_close(site.mean.double(), torch.tensor(mean, dtype=torch.float64), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(site.var.double(), torch.tensor(var, dtype=torch.float64), rtol=1e-3, atol=1e-7)


def test_per_position_scores_match_reference() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 6, 5, generator=g)
    mean, var = torch.randn(4, 5, generator=g), torch.rand(4, 5, generator=g) + 0.1
    count = torch.tensor([3, 3, 0, 3])  # row 2 holds no data: left out of the compensation
    fast = monosemanticity_scores(z, mean, var, eps=0.01, count=count)
    torch.testing.assert_close(fast.double(), reference.scores_per_position(z, mean, var, count, 0.01), rtol=1e-5, atol=1e-6)
    everything = monosemanticity_scores(z, mean, var, eps=0.01)  # default: every row counts
    want = reference.scores_per_position(z, mean, var, torch.full((4,), 2), 0.01)
    torch.testing.assert_close(everything.double(), want, rtol=1e-5, atol=1e-6)
    uncompensated = reference.scores_per_position(z, mean, var, torch.zeros(4), 0.01)
    assert not torch.allclose(want, uncompensated, rtol=1e-3)  # the default really compensates


def test_l2e_penalises_the_per_position_threshold_selection(corpus: torch.Tensor) -> None:
    config = per_position(strength=0.1, warmup_steps=0, ratio=0.05, layers=(1,))
    model, opt, data = warmed_up(config, corpus)
    site = next(iter(opt.sites.values()))
    ids = torch.cat([next(data), next(data)])  # type: ignore[call-overload]
    touched, z = penalised_values(model, opt, ids)
    z3 = z.reshape(ids.shape[0], ids.shape[1], -1)
    phi = reference.scores_per_position(z3, site.mean, site.var, site.count, config.eps).reshape(z.shape)
    want = torch.zeros_like(touched)
    for t, i in reference.threshold_selection(phi, float(site.threshold)):
        want[t, i] = True
    assert want.any() and torch.equal(touched, want)


def extreme_first_token_model() -> nn.Module:
    """GPT-NeoX whose token 0 (put at position 0 of every sequence) drives every MLP neuron far from
    where other tokens put it, like the first-token massive activations of real LMs: embedding
    coordinate 0 is 1 for token 0 only, and every up projection reads coordinate 0 with weight 1."""
    model = tiny_gpt_neox(layers=2)
    with torch.no_grad():
        embed = model.gpt_neox.embed_in.weight
        embed[:, 0] = 0.0
        embed[0] = 0.0
        embed[0, 0] = 1.0
        for layer in model.gpt_neox.layers:
            layer.mlp.dense_h_to_4h.weight[:, 0] = 1.0
    return model


def first_position_share(statistics: str, corpus: torch.Tensor) -> list[float]:
    model = extreme_first_token_model()
    # Block 0, whose MLP reads LayerNorm(embedding) (GPT-NeoX's parallel residual): position 0's
    # activation is the same constant in every sequence.
    config = L2EConfig(inhibition="none", statistics=statistics, max_positions=16, layers=(0,))  # type: ignore[arg-type]
    opt = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), model, config=config)
    seen, _ = capture(model, list(opt.sites))
    picked = {name: torch.zeros(2, dtype=torch.float64) for name in opt.sites}
    data = batches(corpus, 8, 15)
    for step in range(30):
        ids = torch.cat([torch.zeros(8, 1, dtype=torch.long), next(data)], 1)
        lm_loss(model, ids).backward()
        for name, site in opt.sites.items():  # what the moving threshold selects, before the step
            z = seen[name].pop().detach()
            count = None if site.rows is None else site.count
            selected = monosemanticity_scores(z, site.mean, site.var, eps=config.eps, count=count) >= site.threshold
            if step >= 5:
                picked[name] += position_shares(selected, 1) * selected.sum()
        opt.step()
        opt.zero_grad()
    return [float(p[0] / p.sum()) for p in picked.values()]


def test_pooled_statistics_spend_the_selections_on_an_extreme_first_position(corpus: torch.Tensor) -> None:
    # Position 0 is 1/16 of the tokens. Pooled, its constant extreme activation looks
    # monosemantic in every neuron; per position, it is its own (constant) normal.
    pooled = first_position_share("pooled", corpus)
    separate = first_position_share("per-position", corpus)
    assert pooled[0] > 0.8, pooled
    assert separate[0] < 0.02, separate


def test_threshold_holds_its_ratio_with_per_position_statistics(corpus: torch.Tensor) -> None:
    ratio = 0.02
    model = tiny_gpt_neox(layers=2, hidden=32)
    config = L2EConfig(ratio=ratio, statistics="per-position", max_positions=16)
    opt = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), model, config=config)
    fractions = []
    for ids, _ in zip(batches(corpus, 8, 16), range(300)):
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
        fractions.append(torch.stack([site.selected_fraction for site in opt.sites.values()]))
    last = torch.stack(fractions[-50:]).mean(0)
    assert ((last - ratio).abs() / ratio < 0.2).all(), last.tolist()


def test_memel_per_position_changes_exactly_topk_per_sequence(corpus: torch.Tensor) -> None:
    config = per_position(inhibition="memel", memel_topk=2, warmup_steps=0)
    model, opt, data = warmed_up(config, corpus)
    site = next(iter(opt.sites.values()))
    raw, after = site_before_and_after(model, opt)
    ids = torch.cat([next(data) for _ in range(3)])  # type: ignore[call-overload]
    with torch.no_grad():
        model(input_ids=ids)
    z, changed = raw[0], raw[0] != after[0]
    phi = reference.scores_per_position(z, site.mean, site.var, site.count, config.eps)
    for b in range(ids.shape[0]):
        assert int(changed[b].sum()) == 2
        assert torch.equal(phi[b][changed[b]].sort().values, torch.topk(phi[b].flatten(), 2).values.sort().values)
    # Reverse Deactivation writes each value's own position's mean.
    rows = torch.arange(z.shape[1]).clamp_max(MAX_POSITIONS)
    expected = site.mean[rows].expand_as(z)[changed]
    torch.testing.assert_close(after[0][changed], expected)


def test_a_checkpoint_with_other_statistics_is_refused_unchanged(corpus: torch.Tensor) -> None:
    model = tiny_gpt_neox(layers=2)
    pooled = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), model)
    state = pooled.state_dict()
    pooled.remove_hooks()
    opt = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), model, config=per_position())
    lm_loss(model, next(batches(corpus, 2, SEQ))).backward()
    opt.step()
    before = {n: {k: v.clone() for k, v in s.tensors().items()} for n, s in opt.sites.items()}
    with pytest.raises(CheckpointError, match=r"statistics='pooled'.*statistics='per-position'.*saved settings"):
        opt.load_state_dict(state)
    for name, site in opt.sites.items():
        assert all(torch.equal(v, before[name][k]) for k, v in site.tensors().items())


@pytest.mark.parametrize("mode", ["l2e", "memel"])
def test_no_host_sync_with_per_position_statistics(corpus: torch.Tensor, mode: str) -> None:
    model = PlainLM(layers=2)
    config = L2EConfig(inhibition=mode, warmup_steps=1, statistics="per-position", max_positions=4)  # type: ignore[arg-type]
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.01), model, config=config)
    data = batches(corpus, 2, 9)
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    storage = {n: {k: v.data_ptr() for k, v in s.tensors().items()} for n, s in opt.sites.items()}
    for step in range(3):
        ids = next(data)
        opt.set_token_mask(mask if step == 2 else None)
        with _SyncTrap():
            model.loss(ids).backward()
            opt.step()
            opt.zero_grad()
    assert {n: {k: v.data_ptr() for k, v in s.tensors().items()} for n, s in opt.sites.items()} == storage


def test_fkr_tooling_takes_per_position_scores(corpus: torch.Tensor) -> None:
    # The FKR of a wrapper's per-position statistics: score with the site's rows, flatten, measure.
    config = per_position(inhibition="none", warmup_steps=0)
    model, opt, data = warmed_up(config, corpus)
    site = next(iter(opt.sites.values()))
    seen, _ = capture(model, [site.name])
    ids = torch.cat([next(data) for _ in range(4)])  # type: ignore[call-overload]
    with torch.no_grad():
        model(input_ids=ids)
    phi = monosemanticity_scores(seen[site.name][0], site.mean, site.var, eps=config.eps, count=site.count)
    features = ids.reshape(-1) % 3  # any labelling
    fkr = float(false_killing_rate(phi.reshape(-1, site.neurons), features, ratio=0.02))
    assert 0.0 <= fkr <= 1.0
    assert phi.shape == (*ids.shape, site.neurons)
