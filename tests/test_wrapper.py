"""The torch.optim contract, the core bit-identity promise, schedulers, threshold convergence and
the no-host-sync guarantee of L2EWrapper."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from conftest import batches
from l2e_optim import L2EConfig, L2EWrapper
from l2e_optim._lab.zoo import PlainLM, tiny_gpt_neox

OptimFactory = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]

BASES: dict[str, OptimFactory] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
}


@pytest.mark.parametrize("config", [L2EConfig(strength=0.0, warmup_steps=0), L2EConfig(inhibition="none")],
                         ids=["strength0", "none"])
@pytest.mark.parametrize("base", sorted(BASES))
def test_bit_identical_to_the_bare_optimizer(corpus: torch.Tensor, base: str, config: L2EConfig) -> None:
    plain_model, wrapped_model = PlainLM(seed=1), PlainLM(seed=1)
    plain = BASES[base](plain_model.parameters())
    wrapped = L2EWrapper(BASES[base](wrapped_model.parameters()), wrapped_model, config=config)
    for ids, _ in zip(batches(corpus, 4, 17), range(20)):
        for model, opt in ((plain_model, plain), (wrapped_model, wrapped)):
            model.loss(ids).backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(plain_model.parameters(), wrapped_model.parameters()):
        assert torch.equal(p, q)
    assert int(wrapped.step_count) == 20
    assert all(int(site.count) > 0 for site in wrapped.sites.values())  # the hooks did run


def test_is_an_optimizer_sharing_the_base_objects() -> None:
    model = PlainLM()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = L2EWrapper(base, model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    model.loss(torch.randint(0, 256, (2, 9))).backward()
    opt.step()
    base.load_state_dict(base.state_dict())  # replaces base.param_groups / base.state objects
    assert opt.param_groups is base.param_groups and opt.state is base.state
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is base.param_groups and opt.state is base.state
    assert opt.base_optimizer is base
    assert "L2EWrapper(inhibition='l2e'" in repr(opt) and "AdamW" in repr(opt)


def test_state_of_base_params_has_no_l2e_keys() -> None:
    model = PlainLM()
    opt = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), model)
    model.loss(torch.randint(0, 256, (2, 9))).backward()
    opt.step()
    assert {key for state in opt.state.values() for key in state} == {"step", "exp_avg", "exp_avg_sq"}


def test_state_dict_loads_with_weights_only(tmp_path: object) -> None:
    import pathlib

    model = PlainLM()
    opt = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), model)
    model.loss(torch.randint(0, 256, (2, 9))).backward()
    opt.step()
    path = pathlib.Path(str(tmp_path)) / "opt.pt"
    torch.save(opt.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    fresh_model = PlainLM()
    fresh = L2EWrapper(torch.optim.AdamW(fresh_model.parameters(), lr=1e-3), fresh_model)
    fresh.load_state_dict(loaded)
    for name, site in opt.sites.items():
        for key, tensor in site.tensors().items():
            assert torch.equal(tensor, fresh.sites[name].tensors()[key]), key
    assert int(fresh.step_count) == 1


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.9**s),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=12),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
         torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6)],
        milestones=[3],
    ),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


def run_schedule(name: str, wrap: bool, steps: int, resume_at: int | None = None) -> list[float]:
    def build() -> tuple[PlainLM, torch.optim.Optimizer, object]:
        model = PlainLM(layers=2, seed=3)
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if wrap:
            opt = L2EWrapper(opt, model, config=L2EConfig(warmup_steps=0))
        return model, opt, SCHEDULERS[name](opt)

    model, opt, sched = build()
    lrs, data = [], batches(torch.arange(2000) % 256, 2, 9)
    for step in range(steps):
        if step == resume_at:
            saved = (model.state_dict(), opt.state_dict(), sched.state_dict())  # type: ignore[attr-defined]
            model, opt, sched = build()
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
            sched.load_state_dict(saved[2])  # type: ignore[attr-defined]
        loss = model.loss(next(data))
        loss.backward()
        opt.step()
        if name == "ReduceLROnPlateau":
            sched.step(1.0)  # type: ignore[attr-defined]  # a plateau: the lr must drop
        else:
            sched.step()  # type: ignore[attr-defined]
        opt.zero_grad()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_drives_the_base_lr(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        wrapped = run_schedule(name, wrap=True, steps=10)
    plain = run_schedule(name, wrap=False, steps=10)
    assert wrapped == plain
    assert len(set(wrapped)) > 1  # the schedule really changed the learning rate
    assert run_schedule(name, wrap=True, steps=10, resume_at=5) == wrapped


@pytest.mark.parametrize("ratio", [0.01, 0.02, 0.05])
def test_threshold_converges_to_the_target_ratio(corpus: torch.Tensor, ratio: float) -> None:
    model = tiny_gpt_neox(layers=2, hidden=32)
    opt = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), model, config=L2EConfig(ratio=ratio))
    fractions = []
    for ids, _ in zip(batches(corpus, 4, 32), range(300)):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        fractions.append(torch.stack([site.selected_fraction for site in opt.sites.values()]))
    last = torch.stack(fractions[-50:]).mean(0)
    assert ((last - ratio).abs() / ratio < 0.2).all(), (ratio, last.tolist())


def test_threshold_init_and_lr_options(corpus: torch.Tensor) -> None:
    model = PlainLM(layers=2)
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.0), model,
                     config=L2EConfig(threshold_init=100.0, threshold_lr=0.5, inhibition="none"))
    site = next(iter(opt.sites.values()))
    assert float(site.threshold) == 100.0
    for ids, _ in zip(batches(corpus, 4, 17), range(3)):
        model.loss(ids).backward()
        opt.step()
        opt.zero_grad()
    # Nothing scores >= 100 in a fresh model: the selected fraction is 0 and tau drops by exp(-0.5)
    # on each of the two scored steps (step 1 had no statistics yet).
    assert float(site.selected_fraction) == 0.0
    assert abs(float(site.threshold) - 100.0 * torch.exp(torch.tensor(-1.0)).item()) < 1e-3


def test_paused_remove_hooks_and_metrics(corpus: torch.Tensor) -> None:
    model = PlainLM(layers=2)
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.01), model)
    ids = next(batches(corpus, 2, 9))
    with opt.paused():
        model.loss(ids).backward()
    opt.step()
    assert all(int(site.count) == 0 for site in opt.sites.values())
    model.loss(ids).backward()
    opt.step()
    assert all(int(site.count) == 16 for site in opt.sites.values())
    metrics = opt.metrics()
    assert metrics["l2e/step"] == 2.0
    assert {k.rsplit("/", 1)[-1] for k in metrics if k != "l2e/step"} == {
        "threshold", "selected_fraction", "nonfinite_microbatches", "mean_var"}
    assert all(isinstance(v, float) for v in metrics.values())
    opt.remove_hooks()
    opt.remove_hooks()  # idempotent
    model.loss(ids).backward()
    opt.step()
    assert all(int(site.count) == 16 for site in opt.sites.values())


def test_constructor_rejects_bad_arguments() -> None:
    model = PlainLM(layers=2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(TypeError, match="base_optimizer must be a torch.optim.Optimizer"):
        L2EWrapper(object(), model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        L2EWrapper(sgd, object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be an L2EConfig"):
        L2EWrapper(sgd, model, config={"ratio": 0.1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tap='sideways'"):
        L2EWrapper(sgd, model, tap="sideways")  # type: ignore[arg-type]
    wrapped = L2EWrapper(sgd, model)
    with pytest.raises(TypeError, match="already an L2EWrapper"):
        L2EWrapper(wrapped, model)


class _SyncTrap:
    """Makes every host-device synchronisation point of a tensor raise."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero")

    def __enter__(self) -> None:
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}
        self.saved_nonzero = torch.nonzero

        def trap(*args: object, **kwargs: object) -> None:
            raise AssertionError("host synchronisation")

        for name in self.NAMES:
            setattr(torch.Tensor, name, trap)
        torch.nonzero = trap  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = self.saved_nonzero  # type: ignore[assignment]


@pytest.mark.parametrize("mode", ["l2e", "memel", "none"])
@pytest.mark.parametrize("retrieval", ["auto", "batch-topk", "sample-topk"])
def test_no_host_sync_in_forward_backward_and_step(corpus: torch.Tensor, mode: str, retrieval: str) -> None:
    # The eager tap: what runs on an accelerator without Triton, and the form torch.compile
    # traces. ("auto" picks the blocked tap on CPU, which reads two scalars on the host by design:
    # free on a CPU, and refused on any other device; tests/test_cuda.py checks Triton's path.)
    model = PlainLM(layers=2)
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), model,
                     config=L2EConfig(inhibition=mode, warmup_steps=1, retrieval=retrieval, kernel="eager"))  # type: ignore[arg-type]
    data = batches(corpus, 2, 9)
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    for step in range(3):
        ids = next(data)
        opt.set_token_mask(mask if step == 2 else None)
        with _SyncTrap():
            loss = model.loss(ids)
            loss.backward()
            opt.step()
            opt.zero_grad()
    with _SyncTrap(), pytest.raises(AssertionError, match="host synchronisation"):
        float(loss)  # the trap itself works
    assert int(opt.step_count) == 3


def test_metrics_warn_only_when_steps_saw_no_token(corpus: torch.Tensor) -> None:
    model = PlainLM(layers=2)
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.01), model)
    data = batches(corpus, 2, 9)

    def train(steps: int) -> None:
        for _ in range(steps):
            model.loss(next(data)).backward()
            opt.step()
            opt.zero_grad()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.metrics()
        train(2)
        opt.metrics()  # the hooks ran
        opt.metrics()  # no step since: nothing to say
        with opt.paused():
            train(1)
            opt.metrics()  # paused on purpose
    model.eval()  # a loop that forgot model.train(): the hooks stay off
    train(3)
    with pytest.warns(RuntimeWarning, match="3 optimizer steps since the last metrics.. call, and none of the 2"):
        opt.metrics()

