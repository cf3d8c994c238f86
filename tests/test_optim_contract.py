"""PyTorch's own optimizer tests (test/test_optim.py, ``TestOptimRenewed``), ported to the wrapper.

Every CPU optimizer in ``torch.testing._internal.common_optimizers.optim_db`` with every one of
its configurations (and its foreach / fused variants), wrapped in an L2EWrapper on a tiny model,
in mode ``none`` (must be bit-equal to the bare optimizer) and mode ``l2e`` (the contract holds
while inhibiting). Ported: direction with LR schedulers, state-dict determinism and resume,
weights-only save/load, older state dicts, non-tensor steps, state-dict and step hooks (local and
global), deep copies, no-op steps, printing, non-empty state. Left out, with the reason:
``test_errors`` (the errors are the base's constructor's, raised before a wrapper exists),
complex and sparse *parameter* tests beyond SparseAdam (site activations must be real), and the
CUDA-only and memory tests (covered by tests/test_cuda.py where they apply).
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

_flags_were_free = not torch.backends.flags_frozen()
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerInfo,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

# Importing torch's test utilities freezes torch.backends flags for the whole process
# (common_utils calls disable_global_flags); give the rest of the suite its process back.
vars(torch.backends)["__allow_nonbracketed_mutation_flag"] = _flags_were_free

from conftest import assert_identical  # noqa: E402
from l2e_optim import L2EConfig, L2EWrapper  # noqa: E402

# torch's own optimizer cases step on synthetic gradients without a forward: the wrapper's
# first-step notice that its hooks never ran is expected there.
pytestmark = pytest.mark.filterwarnings("ignore:L2E. an optimizer step was taken:RuntimeWarning")

INFOS = {info.name: info for info in optim_db}
MODES = {
    "none": L2EConfig(inhibition="none"),
    "strength0": L2EConfig(warmup_steps=0, strength=0.0),
    "l2e": L2EConfig(warmup_steps=0, strength=0.05),
}
VOCAB, WIDTH = 32, 8


class Tiny(nn.Module):
    """Embedding, one MLP (the site: ``mlp.2``'s input), a head: small enough for ~1500 cases."""

    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH, sparse=sparse)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.embed(ids)))


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def loss_of(model: Tiny) -> torch.Tensor:
    logits = model(IDS[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), IDS[:, 1:].reshape(-1))


def trainable(info: OptimizerInfo, model: Tiny) -> list[nn.Parameter]:
    """What each optimizer can take: SparseAdam sparse-gradient params only, Muon 2-D ones."""
    if info.only_supports_sparse_grads:
        return [model.embed.weight]
    if info.name == "Muon":
        return [p for p in model.parameters() if p.dim() == 2]
    return list(model.parameters())


def build(
    info: OptimizerInfo, kwargs: dict[str, Any], mode: str | None, named: bool = False
) -> tuple[Tiny, torch.optim.Optimizer]:
    """A fresh model and its optimizer: bare (``mode=None``) or wrapped in mode ``mode``; built
    on ``(name, param)`` pairs if ``named`` (torch stores ``param_names`` in the groups then)."""
    model = Tiny(sparse=info.only_supports_sparse_grads)
    params: list[Any] = trainable(info, model)
    if named:
        names = {id(p): name for name, p in model.named_parameters()}
        params = [(names[id(p)], p) for p in params]
    base = info.optim_cls(params, **copy.deepcopy(kwargs))
    if mode is None:
        return model, base
    return model, L2EWrapper(base, model, config=MODES[mode], sites=["mlp.2"])


def closure_for(model: Tiny, opt: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    return closure


def train(model: Tiny, opt: torch.optim.Optimizer, info: OptimizerInfo, steps: int, skip: int = -1) -> list[Any]:
    """``steps`` optimizer steps; at step ``skip`` no backward runs (every grad is None)."""
    losses = []
    for i in range(steps):
        closure = closure_for(model, opt)
        if info.step_requires_closure:
            losses.append(opt.step(closure))
        else:
            opt.zero_grad()
            if i != skip:
                losses.append(closure())
            opt.step()
    return losses


def inputs(info: OptimizerInfo, with_variants: bool) -> Iterator[dict[str, Any]]:
    """The optimizer's optim_db configurations; with their foreach / fused variants if asked."""
    if with_variants:
        found = _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info, skip=("differentiable",))
    else:
        found = info.optim_inputs_func(device="cpu")
    for optim_input in found:
        if not optim_input.kwargs.get("capturable", False):  # capturable is CUDA-only
            yield optim_input.kwargs


def _assert_same_state(bare: torch.optim.Optimizer, wrapped: torch.optim.Optimizer) -> None:
    """The wrapper's state dict is the bare one plus the L2E entry and records (state_layout)."""
    a, b = bare.state_dict(), wrapped.state_dict()
    b.pop("l2e")
    for pid, entry in list(b["state"].items()):
        entry = {k: v for k, v in entry.items() if k != "l2e"}
        if entry:
            b["state"][pid] = entry
        else:  # records only, or the empty entries a stateless base (plain SGD) gets for DCP
            del b["state"][pid]
    assert_identical(a, b)


def optimizers(*, closure: bool | None = None) -> list[Any]:
    return [pytest.param(name, id=name) for name, info in INFOS.items() if closure is None or info.step_requires_closure == closure]


# -- the core promise: mode "none" (and strength 0) is the bare optimizer, bit for bit -----------
@pytest.mark.parametrize("variants", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["plain", "variants"])
@pytest.mark.parametrize("mode", ["none", "strength0"])
@pytest.mark.parametrize("name", optimizers())
def test_mode_none_is_bit_equal_to_the_bare_optimizer(name: str, mode: str, variants: bool) -> None:
    info = INFOS[name]
    for kwargs in inputs(info, variants):
        bare_model, bare = build(info, kwargs, None)
        model, opt = build(info, kwargs, mode)
        expected = train(bare_model, bare, info, 4, skip=2)
        got = train(model, opt, info, 4, skip=2)
        assert_identical(got, expected)
        for p, q in zip(bare_model.parameters(), model.parameters()):
            assert torch.equal(p, q), (name, kwargs)
        _assert_same_state(bare, opt)
        assert int(opt.step_count) == 4


@pytest.mark.parametrize("name", optimizers())
def test_l2e_mode_goes_the_right_direction_with_schedulers(name: str) -> None:
    info = INFOS[name]
    kwargs = next(inputs(info, False))
    for make_schedulers in info.scheduler_inputs:
        model, opt = build(info, kwargs, "l2e")
        schedulers = [make(opt) for make in make_schedulers]
        initial = float(loss_of(model).detach())
        for _ in range(6):
            loss = train(model, opt, info, 1)[-1]
            for scheduler in schedulers:
                scheduler.step(loss.detach()) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
        assert float(loss_of(model).detach()) < initial
        assert int(opt.step_count) == 6
        assert all(int(site.count) > 0 for site in opt.sites.values())


# -- state dicts ---------------------------------------------------------------------------------
def trained_runs(name: str, steps: int) -> Iterator[tuple[OptimizerInfo, Tiny, torch.optim.Optimizer]]:
    """For each configuration of optimizer ``name``, a wrapped run trained ``steps`` steps."""
    info = INFOS[name]
    for kwargs in inputs(info, False):
        model, opt = build(info, kwargs, "l2e")
        train(model, opt, info, steps)
        yield info, model, opt


def trained_and_resumed(
    info: OptimizerInfo, kwargs: dict[str, Any], steps: int, named: tuple[bool, bool] = (False, False)
) -> tuple[Tiny, torch.optim.Optimizer, Tiny, torch.optim.Optimizer]:
    """A wrapped run trained ``steps`` steps, and a fresh one that loaded its model and optimizer."""
    model, opt = build(info, kwargs, "l2e", named=named[0])
    train(model, opt, info, steps)
    model_c, opt_c = build(info, kwargs, "l2e", named=named[1])
    model_c.load_state_dict(model.state_dict())
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    return model, opt, model_c, opt_c


@pytest.mark.parametrize("name", optimizers())
def test_state_dict_resume_is_deterministic(name: str) -> None:
    info = INFOS[name]
    for kwargs in inputs(info, False):
        model, opt, model_c, opt_c = trained_and_resumed(info, kwargs, 3)
        train(model, opt, info, 3)
        train(model_c, opt_c, info, 3)
        for p, q in zip(model.parameters(), model_c.parameters()):
            assert torch.equal(p, q), (name, kwargs)
        assert_identical(opt.state_dict(), opt_c.state_dict())
        # Repeated parameters have identical representations (pytorch#36831).
        opt_c.param_groups.extend(opt_c.param_groups)
        assert opt.state_dict()["param_groups"][-1] == opt_c.state_dict()["param_groups"][-1]


@pytest.mark.parametrize("named", [(True, False), (False, True), (True, True)], ids=["named-to-plain", "plain-to-named", "named"])
@pytest.mark.parametrize("name", optimizers())
def test_state_dict_loads_between_named_and_plain_parameters(name: str, named: tuple[bool, bool]) -> None:
    info = INFOS[name]
    kwargs = next(inputs(info, False))
    model, opt, model_c, opt_c = trained_and_resumed(info, kwargs, 2, named)
    train(model, opt, info, 2)
    train(model_c, opt_c, info, 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_c.parameters()))
    expected = [n for n, p in model.named_parameters() if any(p is q for q in trainable(info, model))]
    assert opt_c.state_dict()["param_groups"][0].get("param_names", expected) == expected


@pytest.mark.parametrize("name", optimizers())
def test_state_dict_saves_and_loads_weights_only(name: str) -> None:
    for _, _, opt in trained_runs(name, 2):
        saved = opt.state_dict()
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        buffer.seek(0)
        assert_identical(torch.load(buffer, weights_only=True), saved)


@pytest.mark.parametrize("name", optimizers())
def test_loads_older_state_dicts_and_nontensor_steps(name: str) -> None:
    for info, model, opt in trained_runs(name, 2):
        old = copy.deepcopy(opt.state_dict())
        for group in old["param_groups"]:
            for flag in info.not_og_supported_flags:
                group.pop(flag, None)
        for entry in old["state"].values():
            if torch.is_tensor(entry.get("step")):
                entry["step"] = entry["step"].item()
        opt.load_state_dict(old)
        train(model, opt, info, 1)
        assert int(opt.step_count) == 3


# -- hooks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", optimizers())
def test_state_dict_and_load_state_dict_hooks(name: str) -> None:
    info = INFOS[name]
    model, opt = build(info, next(inputs(info, False)), "l2e")

    def pre(o: torch.optim.Optimizer) -> None:
        o.state["test"] = 1

    def post(o: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        sd["ran_pre"] = sd["state"].pop("test", None) == 1
        return sd

    opt.register_state_dict_pre_hook(pre)
    assert opt.state_dict()["state"]["test"] == 1
    opt.register_state_dict_post_hook(post)
    saved = opt.state_dict()
    assert saved["ran_pre"] and "test" not in saved["state"] and "l2e" in saved
    saved.pop("ran_pre")

    def load_pre1(o: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        sd["param_groups"][0]["lr"] = 0.002

    def load_pre2(o: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        mine = copy.deepcopy(sd)
        mine["param_groups"][0]["lr"] = 0.003
        return mine

    def load_post(o: torch.optim.Optimizer) -> None:
        o.state["ran_load_post"] = True  # state not keyed by a parameter: torch keeps it

    opt.register_load_state_dict_pre_hook(load_pre1)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(load_pre2, prepend=True)
    opt.register_load_state_dict_post_hook(load_post)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.002 and opt.state["ran_load_post"]
    opt.load_state_dict(opt.state_dict())  # with the extra entries in it


@pytest.mark.parametrize("name", optimizers())
def test_step_hooks_local_and_global_fire_once_in_order(name: str) -> None:
    info = INFOS[name]
    model, opt = build(info, next(inputs(info, False)), "l2e")
    other = torch.optim.SGD([nn.Parameter(torch.ones(2))])
    data: list[int] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: data.append(0)),
        register_optimizer_step_post_hook(lambda o, a, k: data.append(5)),
        opt.register_step_pre_hook(lambda o, a, k: data.append(1)),
        opt.register_step_post_hook(lambda o, a, k: data.append(2)),
        other.register_step_pre_hook(lambda o, a, k: data.append(1)),
        other.register_step_post_hook(lambda o, a, k: data.append(2)),
    ]
    try:
        train(model, opt, info, 1)
        assert data == [0, 1, 2, 5]
        other.step()
        train(model, opt, info, 1)
        assert data == [0, 1, 2, 5] * 3
    finally:
        for handle in handles:
            handle.remove()
    train(model, opt, info, 1)
    other.step()
    assert data == [0, 1, 2, 5] * 3


# -- copies, printing, no-op steps -----------------------------------------------------------------
@pytest.mark.parametrize("name", optimizers())
def test_deepcopy_copies_all_public_attrs_and_never_steps_the_original(name: str) -> None:
    info = INFOS[name]
    for make_schedulers in [[], *info.scheduler_inputs[:1]]:
        model, opt = build(info, next(inputs(info, False)), "l2e")
        for make in make_schedulers:
            make(opt)
        train(model, opt, info, 2)
        snap = copy.deepcopy(opt)
        public = {k for k in vars(opt) if not k.startswith("_")} - {"step"}  # the scheduler's patch
        assert public == {k for k in vars(snap) if not k.startswith("_")}
        if info.step_requires_closure:
            continue  # a deep copy of a bare LBFGS cannot step either (it loses `_params`: torch)
        weights = [p.detach().clone() for p in model.parameters()]
        for p in snap.param_groups[0]["params"]:
            p.grad = torch.ones_like(p).to_sparse() if info.only_supports_sparse_grads else torch.ones_like(p)
        snap.step()
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
        assert not all(torch.equal(p, w) for p, w in zip(snap.param_groups[0]["params"], weights))


@pytest.mark.parametrize("name", optimizers())
def test_step_is_a_noop_without_grads_and_for_zero_grads(name: str) -> None:
    info = INFOS[name]
    for kwargs in inputs(info, True):
        if kwargs.get("weight_decay", 0) or name == "AdamW":  # both move params without a grad
            continue
        model, opt = build(info, kwargs, "l2e")
        repr(opt)  # test_optimizer_can_be_printed
        weights = [p.detach().clone() for p in model.parameters()]
        closure = functools.partial(torch.ones, ())
        opt.step(closure)  # every grad is None
        for p in trainable(info, model):
            p.grad = torch.zeros_like(p).to_sparse() if info.only_supports_sparse_grads else torch.zeros_like(p)
        # These move with a zero grad (ASGD decays by lambd, Muon normalises it, LBFGS and
        # Adafactor divide by it), bare or wrapped.
        if info.name not in ("ASGD", "Muon", "LBFGS", "Adafactor"):
            opt.step(closure)
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights)), (name, kwargs)
        assert all(int(site.count) == 0 for site in opt.sites.values())


@pytest.mark.parametrize("name", optimizers())
def test_state_is_not_empty_after_a_step(name: str) -> None:
    info = INFOS[name]
    for kwargs in inputs(info, False):
        model, opt = build(info, kwargs, "l2e")
        train(model, opt, info, 1)
        assert all(len(state) > 0 for state in opt.state.values()), (name, kwargs)
