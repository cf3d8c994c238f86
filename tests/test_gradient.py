"""Model-level equivalences: statistics, the L2E gradient and Reverse Deactivation, against the
float64 references on activations captured from a real model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import batches
from l2e_optim import L2EConfig, L2EWrapper
from l2e_optim._lab.zoo import PlainLM, tiny_gpt_neox
from l2e_optim._src import reference


def capture(model: nn.Module, names: list[str]) -> tuple[dict[str, list[torch.Tensor]], list[object]]:
    """Record each site's input (with its graph) on every forward."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            seen[name].append(args[0])
        handles.append(modules[name].register_forward_pre_hook(hook))
    return seen, handles


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("forget", [None, 2])
def test_running_statistics_match_reference_merge(corpus: torch.Tensor, forget: int | None) -> None:
    model = tiny_gpt_neox()
    opt = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), model,
                     config=L2EConfig(inhibition="none", forget_steps=forget))
    names = list(opt.sites)
    seen, _ = capture(model, names)
    data = batches(corpus, 4, 16)
    ref = {name: (0, [0.0] * 128, [0.0] * 128) for name in names}
    for _ in range(4):
        lm_loss(model, next(data)).backward()
        opt.step()
        opt.zero_grad()
        for name in names:
            z = seen[name].pop().detach().reshape(-1, 128)
            count, mean, var = ref[name]
            mean, var = reference.merge(count, mean, var, z, forget)
            ref[name] = (count + z.shape[0], mean, var)
    for name, site in opt.sites.items():
        count, mean, var = ref[name]
        assert int(site.count) == count
        torch.testing.assert_close(site.mean.double(), torch.tensor(mean, dtype=torch.float64), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(site.var.double(), torch.tensor(var, dtype=torch.float64), rtol=1e-3, atol=1e-7)


def warmed_up(config: L2EConfig, corpus: torch.Tensor, steps: int = 3) -> tuple[nn.Module, L2EWrapper, object]:
    model = tiny_gpt_neox()
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.05), model, config=config)
    data = batches(corpus, 2, 8)
    for _ in range(steps):
        lm_loss(model, next(data)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, data


def explicit_grads(
    model: nn.Module, opt: L2EWrapper, ids: torch.Tensor, config: L2EConfig, accumulation: int = 1
) -> dict[str, torch.Tensor]:
    """Gradients of ``loss + strength * L_MS`` written out by hand with the float64 reference."""
    twin = copy.deepcopy(model)  # the wrapper's hooks do nothing on a copy
    seen, _ = capture(twin, list(opt.sites))
    loss = lm_loss(twin, ids).double()
    penalty = torch.zeros((), dtype=torch.float64)
    for name, site in opt.sites.items():
        z = seen[name][0].reshape(-1, site.neurons)
        phi = reference.scores(z.detach(), site.mean, site.var, config.eps)
        chosen = reference.threshold_selection(phi, float(site.threshold))
        penalty = penalty + reference.l2e_penalty(z, site.mean, chosen, config.log_eps) / z.shape[0]
    (loss + config.strength / accumulation * penalty).backward()
    return {name: p.grad.double() for name, p in twin.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("strength", "log_eps", "eps"), [(0.05, 1e-6, 0.01), (0.2, 1e-2, 0.5)])
def test_l2e_gradient_equals_autograd_of_explicit_loss(
    corpus: torch.Tensor, strength: float, log_eps: float, eps: float
) -> None:
    config = L2EConfig(strength=strength, log_eps=log_eps, eps=eps, warmup_steps=0, ratio=0.05)
    model, opt, data = warmed_up(config, corpus)
    ids = next(data)  # type: ignore[call-overload]
    expected = explicit_grads(model, opt, ids, config)
    with opt.paused():
        lm_loss(model, ids).backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    opt.zero_grad()
    lm_loss(model, ids).backward()
    changed = 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[name], rtol=2e-4, atol=1e-7)
        changed += not torch.allclose(p.grad, plain[name])
    assert changed > 10  # the regularizer really moved the gradients of upstream parameters


def test_accumulation_divides_the_regularizer(corpus: torch.Tensor) -> None:
    config = L2EConfig(strength=0.1, warmup_steps=0, ratio=0.05, grad_accumulation_steps=4)
    model, opt, data = warmed_up(config, corpus)
    ids = next(data)  # type: ignore[call-overload]
    expected = explicit_grads(model, opt, ids, config, accumulation=4)
    lm_loss(model, ids).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[name], rtol=2e-4, atol=1e-7)


def test_no_inhibition_before_warmup(corpus: torch.Tensor) -> None:
    config = L2EConfig(strength=0.5, warmup_steps=3, ratio=0.05)
    model, opt, data = warmed_up(config, corpus, steps=2)  # step 2 < warmup 3
    ids = next(data)  # type: ignore[call-overload]
    lm_loss(model, ids).backward()
    with_hooks = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    with opt.paused():
        lm_loss(model, ids).backward()
    assert all(torch.equal(p.grad, with_hooks[n]) for n, p in model.named_parameters())
    opt.step()  # step 3: inhibition starts
    opt.zero_grad()
    lm_loss(model, ids).backward()
    active = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    with opt.paused():
        lm_loss(model, ids).backward()
    assert any(not torch.equal(p.grad, active[n]) for n, p in model.named_parameters())


def site_before_and_after(model: nn.Module, opt: L2EWrapper) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For the wrapper's first site: its activation on each forward, before and after the hook."""
    module = dict(model.named_modules())[next(iter(opt.sites))]
    raw: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda m, a: raw.append(a[0]), prepend=True)
    module.register_forward_pre_hook(lambda m, a: after.append(a[0]))
    return raw, after


@pytest.mark.parametrize(("topk", "scale", "retrieval"), [(1, 1.0, "auto"), (3, 0.5, "auto"), (3, 0.5, "token-topk")])
def test_memel_reverse_deactivation_matches_reference(
    corpus: torch.Tensor, topk: int, scale: float, retrieval: str
) -> None:
    config = L2EConfig(inhibition="memel", memel_topk=topk, memel_scale=scale, warmup_steps=0,
                       retrieval=retrieval)  # type: ignore[arg-type]
    model, opt, data = warmed_up(config, corpus)
    site = next(iter(opt.sites.values()))
    raw, after = site_before_and_after(model, opt)
    lm_loss(model, next(data)).backward()  # type: ignore[call-overload]
    z = raw[0]
    z.retain_grad()
    z2 = z.detach().reshape(-1, site.neurons)
    phi = reference.scores(z2, site.mean, site.var, config.eps)
    if retrieval == "token-topk":
        chosen, per_sequence = reference.topk_selection(phi, topk), z.shape[1] * topk
    else:
        chosen, per_sequence = reference.sample_topk_selection(phi, z.shape[0], topk), topk
    ref_out, _ = reference.reverse_deactivation(z2, site.mean, chosen, scale)
    torch.testing.assert_close(after[0].detach().reshape(-1, site.neurons).double(), ref_out, rtol=1e-6, atol=1e-6)
    assert len(chosen) == z.shape[0] * per_sequence


@pytest.mark.parametrize("topk", [1, 4])
def test_memel_changes_exactly_topk_values_per_sequence_its_highest_scores(corpus: torch.Tensor, topk: int) -> None:
    # Default MEmeL settings (but warm-up), padding in one sequence: each sequence loses exactly
    # its `topk` highest-scoring values over all positions x neurons, never a padded one.
    config = L2EConfig(inhibition="memel", memel_topk=topk, warmup_steps=0)
    model, opt, data = warmed_up(config, corpus)
    site = next(iter(opt.sites.values()))
    raw, after = site_before_and_after(model, opt)
    ids = torch.cat([next(data), next(data)])  # type: ignore[call-overload]
    mask = torch.ones(ids.shape)
    mask[1, 5:] = 0
    opt.set_token_mask(mask)
    model(input_ids=ids, attention_mask=mask.long())
    opt.set_token_mask(None)
    z, changed = raw[0].detach(), raw[0] != after[0]  # [batch, seq, N]
    assert changed.sum(dim=(1, 2)).tolist() == [topk] * ids.shape[0]
    assert not changed[1, 5:].any()
    phi = reference.scores(z.reshape(-1, site.neurons), site.mean, site.var, config.eps).reshape(z.shape)
    phi = phi.masked_fill(mask[:, :, None] == 0, -torch.inf)
    for b in range(ids.shape[0]):
        highest = torch.topk(phi[b].flatten(), topk).values
        assert torch.equal(phi[b][changed[b]].sort().values, highest.sort().values)


def test_memel_gradient_is_reversed_on_selected_values(corpus: torch.Tensor) -> None:
    config = L2EConfig(inhibition="memel", memel_scale=0.5, warmup_steps=0)
    model, opt, data = warmed_up(config, corpus)
    name = next(iter(opt.sites))
    module = dict(model.named_modules())[name]
    grads: dict[str, torch.Tensor] = {}
    site = opt.sites[name]

    def keep(module: nn.Module, args: tuple[torch.Tensor, ...], key: str) -> None:
        args[0].register_hook(lambda g: grads.__setitem__(key, g))

    module.register_forward_pre_hook(lambda m, a: keep(m, a, "in"), prepend=True)
    module.register_forward_pre_hook(lambda m, a: keep(m, a, "out"))
    inputs: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()), prepend=True)
    lm_loss(model, next(data)).backward()  # type: ignore[call-overload]
    z2 = inputs[0].reshape(-1, site.neurons)
    samples = inputs[0].shape[0]
    chosen = reference.sample_topk_selection(reference.scores(z2, site.mean, site.var, config.eps), samples, 1)
    _, slope = reference.reverse_deactivation(z2, site.mean, chosen, 0.5)
    torch.testing.assert_close(grads["in"].reshape(-1, site.neurons).double(),
                               grads["out"].reshape(-1, site.neurons).double() * slope)


def penalised_values(model: nn.Module, opt: L2EWrapper, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the wrapper's single site: which activation values the penalty touched, and the values.

    Compares the gradient reaching the site's activation with and without the hooks.
    """
    (name, site), = opt.sites.items()
    grads: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []

    def keep(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.append(args[0].detach().reshape(-1, site.neurons))
        args[0].register_hook(grads.append)

    handle = dict(model.named_modules())[name].register_forward_pre_hook(keep, prepend=True)
    lm_loss(model, ids).backward()
    with opt.paused():
        lm_loss(model, ids).backward()
    handle.remove()
    with_l2e, without = (g.reshape(-1, site.neurons) for g in grads)
    return with_l2e != without, inputs[0]


def test_batch_topk_retrieval_inhibits_exactly_the_top_ratio(corpus: torch.Tensor) -> None:
    # One site, so no other site's penalty reaches this activation's gradient.
    config = L2EConfig(strength=0.1, warmup_steps=0, ratio=0.05, retrieval="batch-topk", layers=(1,))
    model, opt, data = warmed_up(config, corpus)
    site = next(iter(opt.sites.values()))
    touched, z = penalised_values(model, opt, next(data))  # type: ignore[call-overload]
    phi = reference.scores(z, site.mean, site.var, config.eps)
    k = int(torch.tensor(0.05 * phi.numel()).ceil())
    rows, cols = torch.unravel_index(torch.topk(phi.flatten(), k).indices, phi.shape)
    top = set(zip(rows.tolist(), cols.tolist()))
    assert {tuple(ix) for ix in touched.nonzero().tolist()} <= top
    assert int(touched.sum()) >= 0.9 * k  # nearly all of the top-k got the penalty (a few may have d ~ 0)


def test_plain_model_l2e_gradient(corpus: torch.Tensor) -> None:
    # The same equivalence on a model with no Hugging Face code at all.
    model = PlainLM(layers=4)
    config = L2EConfig(strength=0.1, warmup_steps=0, ratio=0.05)
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.05), model, config=config)
    data = batches(corpus, 2, 9)
    for _ in range(3):
        model.loss(next(data)).backward()
        opt.step()
        opt.zero_grad()
    ids = next(data)
    twin = copy.deepcopy(model)
    seen, _ = capture(twin, list(opt.sites))
    loss = twin.loss(ids).double()
    for name, site in opt.sites.items():
        z = seen[name][0].reshape(-1, site.neurons)
        chosen = reference.threshold_selection(reference.scores(z.detach(), site.mean, site.var, 0.01), float(site.threshold))
        loss = loss + 0.1 * reference.l2e_penalty(z, site.mean, chosen, 1e-6) / z.shape[0]
    loss.backward()
    model.loss(ids).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad.double(), rtol=2e-4, atol=1e-7)


def test_random_retrieval_penalises_a_random_ratio_blind_to_scores(corpus: torch.Tensor) -> None:
    # One site, so only its own penalty reaches the gradient of its activation.
    config = L2EConfig(strength=0.1, warmup_steps=0, ratio=0.1, retrieval="random", layers=(1,))
    model, opt, data = warmed_up(config, corpus)
    site = next(iter(opt.sites.values()))
    touched, z = penalised_values(model, opt, torch.cat([next(data) for _ in range(8)]))  # type: ignore[call-overload]
    fraction = float(touched.double().mean())
    assert 0.08 < fraction < 0.12, fraction  # about ratio = 10% of the values, at random
    phi = reference.scores(z[:16], site.mean, site.var, config.eps)
    top = phi >= phi.flatten().quantile(0.9)
    # Blind to the scores: the top-scoring tenth is touched about as often as the rest.
    assert abs(float(touched[:16][top].double().mean()) - fraction) < 0.08


def test_memel_on_2d_activations_treats_each_row_as_a_sample() -> None:
    # A model with no sequence axis: the site sees [rows, N]; each row is its own sample.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 1))
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.01), model, sites=["2"],
                     config=L2EConfig(inhibition="memel", warmup_steps=0))
    for _ in range(2):
        model(torch.randn(8, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
    seen: list[torch.Tensor] = []
    model[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    x = torch.randn(5, 6)
    raw = model[1](model[0](x)).detach()
    model(x)
    assert (raw != seen[0]).sum(dim=1).tolist() == [1] * 5
