"""Faults and inputs at the edges: finite spikes, NaN in padding, odd masks, tiny first batches.

Each test here is the regression test of a defect found by adversarial testing (issue 15).
"""

from __future__ import annotations

import gc
import pathlib
import weakref

import pytest
import torch
from torch import Tensor, nn

from l2e_optim import L2EConfig, L2EWrapper, load_checkpoint, save_checkpoint
from l2e_optim._src import reference
from l2e_optim._src.statistics import MEAN_LIMIT, VAR_LIMIT, merge_moments, moments_from_sums, shifted_sums

WIDTH = 16
SITE = "1"


def probe_model(seed: int = 0) -> nn.Module:
    """Linear(identity) -> Linear: the site's activation is exactly the input (the test controls it)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(WIDTH))
        model[0].bias.zero_()
    return model


def probe(seed: int = 0, **config: object) -> tuple[nn.Module, L2EWrapper]:
    model = probe_model(seed)
    settings: dict[str, object] = {"warmup_steps": 2, "strength": 0.1} | config
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=1e-3), model, config=L2EConfig(**settings), sites=[SITE])  # type: ignore[arg-type]
    return model, opt


def step(model: nn.Module, opt: L2EWrapper, x: Tensor) -> None:
    model(x).mean().backward()
    opt.step()
    opt.zero_grad()


def normal(tokens: int, seed: int) -> Tensor:
    return torch.randn(tokens, WIDTH, generator=torch.Generator().manual_seed(seed))


# -- 1. one finite spike ----------------------------------------------------------------------------
def test_merge_of_a_finite_spike_stays_finite_and_matches_the_float64_reference() -> None:
    """A neuron reading 1e17 for one step (finite in fp32): m*b*delta^2 overflowed into var = inf."""
    tokens, n = 96, 5
    batches = [normal(tokens, s)[:, :n] for s in range(20)]
    spike = normal(tokens, 99)[:, :n]
    spike[:, 2] = 1e17
    batches += [spike] + [normal(tokens, 100 + s)[:, :n] for s in range(30)]
    count = torch.zeros((), dtype=torch.int64)
    mean, var = torch.zeros(n), torch.zeros(n)
    ref_mean, ref_var = [0.0] * n, [0.0] * n
    for batch in batches:
        d = batch - mean
        s1, s2 = shifted_sums(d, d * d, None)
        b = torch.tensor(float(tokens))
        mu_b, var_b = moments_from_sums(b, s1, s2, mean)
        mean, var = merge_moments(count, mean, var, b, mu_b, var_b, 10)
        ref_mean, ref_var = reference.merge(int(count), ref_mean, ref_var, batch, 10)
        count = count + tokens
        assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    torch.testing.assert_close(mean.double(), torch.tensor(ref_mean, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(var.double(), torch.tensor(ref_var, dtype=torch.float64), rtol=1e-3, atol=1e-4)


def test_merge_saturates_at_the_documented_limits() -> None:
    mean, var = torch.tensor([0.0, 3e38]), torch.tensor([0.0, 3e38])  # beyond the limits
    count, b = torch.tensor(10**6), torch.tensor(4e6)
    new_mean, new_var = merge_moments(count, mean, var, b, torch.tensor([-3e38, 3e38]), torch.tensor([3e38, 3e38]), None)
    assert torch.equal(new_mean, torch.tensor([-MEAN_LIMIT, MEAN_LIMIT]))
    assert torch.equal(new_var, torch.tensor([VAR_LIMIT, VAR_LIMIT]))
    inf = torch.tensor([float("inf")])  # sums that overflowed across micro-batches
    mu_b, var_b = moments_from_sums(torch.tensor(4.0), inf, inf, torch.zeros(1))
    assert torch.isfinite(mu_b).all() and torch.isfinite(var_b).all()


def test_a_spike_through_the_wrapper_leaves_a_checkpoint_that_loads(tmp_path: pathlib.Path) -> None:
    model, opt = probe()
    for s in range(20):
        step(model, opt, normal(96, s))
    spike = normal(96, 99)
    spike[:, 3] = 1e17
    step(model, opt, spike)
    for s in range(20):
        step(model, opt, normal(96, 200 + s))
    site = opt.sites[SITE]
    assert torch.isfinite(site.var).all() and torch.isfinite(site.mean).all()
    assert int(site.nonfinite) == 0  # the spike was merged, not skipped
    opt.load_state_dict(opt.state_dict())
    save_checkpoint(tmp_path / "c.safetensors", opt, model=model)
    fresh_model, fresh = probe(seed=1)
    load_checkpoint(tmp_path / "c.safetensors", fresh, model=fresh_model)
    assert torch.equal(fresh.sites[SITE].var, site.var)


# -- 6. NaN in the padding -------------------------------------------------------------------------
def test_nan_at_a_padded_position_does_not_drop_the_micro_batch() -> None:
    clean_model, clean = probe()
    dirty_model, dirty = probe()
    mask = torch.ones(2, 64)
    mask[1, -1] = 0
    poison = torch.zeros(2, 64, WIDTH)
    poison[1, -1] = float("nan")
    poison[1, -1, 0] = float("inf")
    # The padded row's activation is NaN/inf (as an attention row with nothing to attend to can
    # be); added as a constant, so no parameter's gradient sees it, and the head is frozen.
    dirty_model[0].register_forward_hook(lambda module, args, out: out + poison)
    for model in (clean_model, dirty_model):
        model[1].requires_grad_(False)
    for s in range(3):
        x = normal(128, s).reshape(2, 64, WIDTH)
        for model, opt in ((clean_model, clean), (dirty_model, dirty)):
            opt.set_token_mask(mask)
            out = model(x)
            out[mask > 0].mean().backward()  # the loss ignores the padding too
            opt.step()
            opt.zero_grad()
    got, want = dirty.sites[SITE], clean.sites[SITE]
    assert int(got.nonfinite) == 0 and int(got.count) == 3 * 127
    for key, tensor in want.tensors().items():
        torch.testing.assert_close(got.tensors()[key], tensor, rtol=0, atol=0, msg=key)


# -- 7. minor --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [2.0, -1.0, 0.5])
def test_token_mask_values_other_than_0_and_1_are_refused(value: float) -> None:
    _, opt = probe()
    mask = torch.ones(2, 8)
    mask[0, 3] = value
    with pytest.raises(ValueError, match="0 \\(padding\\) or 1"):
        opt.set_token_mask(mask)
    opt.set_token_mask(mask.bool())  # a bool mask is 0/1 by construction
    opt.set_token_mask(torch.ones(2, 8, dtype=torch.long))


def test_a_one_token_first_batch_does_not_make_every_value_monosemantic() -> None:
    model, opt = probe(warmup_steps=0)
    step(model, opt, normal(1, 0))
    step(model, opt, normal(64, 1))
    assert float(opt.sites[SITE].selected_fraction) < 0.5


# -- 3. a dropped wrapper ------------------------------------------------------------------------
def test_a_dropped_wrapper_leaves_nothing_on_the_model() -> None:
    model, opt = probe(warmup_steps=0)
    for s in range(4):
        step(model, opt, normal(64, s))
    assert float(opt.sites[SITE].selected_fraction) > 0  # it was inhibiting
    del opt
    gc.collect()
    assert not model[1]._forward_pre_hooks and not model[1]._forward_hooks
    plain_model = probe_model()
    plain_model.load_state_dict(model.state_dict())
    x = normal(64, 9)
    for m in (model, plain_model):
        m.zero_grad()
        m(x).mean().backward()
    for p, q in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(p.grad, q.grad)  # no L2E gradient any more


def test_hooks_left_on_a_model_copy_do_nothing_once_the_wrapper_is_gone() -> None:
    import copy

    model, opt = probe(warmup_steps=0)
    for s in range(3):
        step(model, opt, normal(64, s))
    twin = copy.deepcopy(model)
    twin.train()
    refs = [weakref.ref(site) for site in opt.sites.values()]
    del opt
    gc.collect()
    assert all(ref() is None for ref in refs)  # the copy's hook closures keep no state alive
    twin(normal(8, 1)).mean().backward()


# -- 5. a skipped step followed by model.zero_grad() ------------------------------------------------
def test_a_step_skipped_by_grad_scaler_then_model_zero_grad_commits_nothing() -> None:
    """HF Trainer clears grads with model.zero_grad(); the skipped step's sums must not leak."""
    model, opt = probe()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt.set_grad_scaler(scaler)
    for s in range(3):
        scaler.scale(model(normal(64, s)).mean()).backward()
        if s == 1:
            model[0].weight.grad[0, 0] = float("inf")  # an overflow: the scaler skips this step
        scaler.step(opt)
        scaler.update()
        model.zero_grad()  # not opt.zero_grad()
    assert int(opt.step_count) == 2
    assert int(opt.sites[SITE].count) == 2 * 64
