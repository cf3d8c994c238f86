"""Regression tests for the torch.optim contract breaks of issue 11: deep copies and pickles,
global step hooks, closure optimizers, foreign state entries, GradScaler's fused path, complex
activations, and the ownership checks (foreign optimizer, two live wrappers)."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from l2e_optim import L2EConfig, L2EWrapper
from l2e_optim._lab.zoo import PlainLM

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
ACTIVE = L2EConfig(warmup_steps=0, strength=0.1)


def _wrapped(config: L2EConfig = ACTIVE, base: type[torch.optim.Optimizer] = torch.optim.SGD, **kwargs: object) -> tuple[PlainLM, L2EWrapper]:
    model = PlainLM(layers=2, seed=0)
    opt = L2EWrapper(base(model.parameters(), **{"lr": 0.1, **kwargs}), model, config=config)
    return model, opt


def _site_tensors(opt: L2EWrapper) -> list[torch.Tensor]:
    return [t.clone() for site in opt.sites.values() for t in site.tensors().values()] + [opt.step_count.clone()]


def test_deepcopy_after_a_scheduler_never_steps_the_original() -> None:
    model, opt = _wrapped()
    torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    model.loss(IDS).backward()
    opt.step()
    model.loss(IDS).backward()
    snap = copy.deepcopy(opt)
    weights, stats = [p.detach().clone() for p in model.parameters()], _site_tensors(opt)
    for p in snap.param_groups[0]["params"]:  # deep copies of parameters carry no grad (torch)
        p.grad = torch.ones_like(p)
    snap.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(a, b) for a, b in zip(_site_tensors(opt), stats))
    # The copy stepped its own parameters; the live step's pending sums stayed with the live grads.
    assert not any(torch.equal(p, w) for p, w in zip(snap.param_groups[0]["params"], weights))
    assert int(snap.step_count) == 2 and int(opt.step_count) == 1
    assert all(torch.equal(a, b) for a, b in zip(_site_tensors(snap)[:-1], stats[:-1]))
    opt.step()
    assert int(opt.step_count) == 2 and not all(torch.equal(a, b) for a, b in zip(_site_tensors(opt), stats))


def test_copy_is_detached_and_keeps_the_statistics() -> None:
    model, opt = _wrapped()
    model.loss(IDS).backward()
    opt.step()
    snap = copy.deepcopy(opt)
    assert [k for k in vars(opt) if not k.startswith("_")] == [k for k in vars(snap) if not k.startswith("_")]
    assert all(torch.equal(a, b) for a, b in zip(_site_tensors(snap), _site_tensors(opt)))
    counts = [int(site.count) for site in opt.sites.values()]
    opt.zero_grad()
    model.loss(IDS).backward()  # only the live wrapper observes the model
    assert [int(s.accumulator.abs().sum() > 0) for s in snap.sites.values()] == [0, 0]
    assert [int(s.accumulator.abs().sum() > 0) for s in opt.sites.values()] == [1, 1]
    opt.step()
    assert [int(site.count) for site in snap.sites.values()] == counts
    # The copy's accumulators are views into its own step buffer again.
    for site in snap.sites.values():
        assert site.accumulator.untyped_storage().data_ptr() == next(iter(snap._buffers.values())).untyped_storage().data_ptr()


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickles_like_a_plain_optimizer(how: str) -> None:
    model, opt = _wrapped(base=torch.optim.Adam, lr=1e-3)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    opt.register_step_post_hook(lambda *args: None)
    model.loss(IDS).backward()
    opt.step()
    if how == "pickle":
        restored = pickle.loads(pickle.dumps(opt))
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=False)
    assert isinstance(restored, L2EWrapper)
    assert restored.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.5e-3
    assert all(torch.equal(a, b) for a, b in zip(_site_tensors(restored), _site_tensors(opt)))
    assert len(restored._optimizer_step_post_hooks) == 0  # hooks are not state (as torch.optim)
    before = [t.clone() for t in _site_tensors(restored)]
    for p in restored.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    restored.step()  # steps its own parameters; the accumulators are views of its buffer again
    assert int(restored.step_count) == 2
    assert all(torch.equal(a, b) for a, b in zip(_site_tensors(restored)[:-1], before[:-1]))
    restored.load_state_dict(opt.state_dict())


def test_global_step_hooks_fire_once_per_step_with_the_wrapper() -> None:
    model, opt = _wrapped()
    seen: list[tuple[str, object]] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append(("post", o))),
        opt.base_optimizer.register_step_pre_hook(lambda o, args, kwargs: seen.append(("base-pre", o))),
        opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("local-post", o))),
    ]
    try:
        model.loss(IDS).backward()
        opt.step()
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [("pre", opt), ("base-pre", opt.base_optimizer), ("local-post", opt), ("post", opt)]


def _lbfgs_closure(model: PlainLM, opt: torch.optim.Optimizer) -> object:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model.loss(IDS)
        loss.backward()
        return loss

    return closure


def test_closure_optimizer_lbfgs_is_supported() -> None:
    bare_model = PlainLM(layers=2, seed=0)
    bare = torch.optim.LBFGS(bare_model.parameters(), lr=0.5, max_iter=4)
    model, opt = _wrapped(L2EConfig(inhibition="none"), base=torch.optim.LBFGS, lr=0.5, max_iter=4)
    for _ in range(2):
        expected = bare.step(_lbfgs_closure(bare_model, bare))
        got = opt.step(_lbfgs_closure(model, opt))
        assert torch.equal(got, expected)
    assert all(torch.equal(p, q) for p, q in zip(bare_model.parameters(), model.parameters()))
    tokens = IDS[:, :-1].numel()
    # The closure starts with zero_grad, so each step commits its last evaluation's tokens once.
    assert all(int(site.count) == 2 * tokens for site in opt.sites.values())
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()


def test_load_state_dict_keeps_entries_not_keyed_by_a_parameter() -> None:
    model, opt = _wrapped()
    model.loss(IDS).backward()
    opt.step()
    opt.state["note"] = {"epoch": 3}  # what torch's own state-dict hook tests do
    saved = opt.state_dict()
    _, fresh = _wrapped()
    fresh.load_state_dict(saved)
    assert fresh.state["note"] == {"epoch": 3}
    assert fresh.state_dict()["state"]["note"] == {"epoch": 3}


def test_grad_scaler_takes_the_base_fused_path() -> None:
    bare_model = PlainLM(layers=2, seed=0)
    bare = torch.optim.AdamW(bare_model.parameters(), lr=1e-2, fused=True)
    model, opt = _wrapped(L2EConfig(inhibition="none"), base=torch.optim.AdamW, lr=1e-2, fused=True)
    assert opt._step_supports_amp_scaling
    for m, o in ((bare_model, bare), (model, opt)):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for _ in range(2):
            o.zero_grad()
            scaler.scale(m.loss(IDS)).backward()
            scaler.step(o)
            scaler.update()
    # The fused kernel unscales inside: the gradients stay scaled (unscale_ would divide them).
    for p, q in zip(bare_model.parameters(), model.parameters()):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    assert not hasattr(opt.base_optimizer, "grad_scale") and not hasattr(opt.base_optimizer, "found_inf")


def test_grad_scaler_fused_step_with_inf_commits_nothing() -> None:
    model, opt = _wrapped(base=torch.optim.AdamW, lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    opt.set_grad_scaler(scaler)
    scaler.scale(model.loss(IDS)).backward()
    scaler.step(opt)
    scaler.update()
    before, weights = _site_tensors(opt), [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model.loss(IDS)).backward()
    model.head.bias.grad[0] = torch.inf
    scaler.step(opt)  # fused: the base skips through found_inf; the wrapper must commit nothing
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(a, b) for a, b in zip(_site_tensors(opt), before))


def test_complex_activation_is_refused_with_a_clear_error() -> None:
    model = nn.Sequential(nn.Linear(4, 8, dtype=torch.cfloat), nn.Linear(8, 4, dtype=torch.cfloat))
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model, sites=["1"])
    with pytest.raises(TypeError, match="complex activation"):
        model(torch.randn(3, 4, dtype=torch.cfloat))
    assert int(opt.step_count) == 0


def test_an_optimizer_over_another_model_is_refused() -> None:
    model, other = PlainLM(layers=2), PlainLM(layers=2)
    with pytest.raises(ValueError, match="never train"):
        L2EWrapper(torch.optim.SGD(other.parameters(), lr=0.1), model)


def test_two_live_wrappers_on_one_model_are_flagged() -> None:
    model, first = _wrapped()
    with pytest.warns(UserWarning, match="already hooked by another live L2EWrapper"):
        L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model)
    first.remove_hooks()  # and the second one is garbage already: nothing live hooks the model
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model)
