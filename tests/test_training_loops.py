"""The training loops people actually run: accumulation, checkpointing, eval, padding, non-finite
micro-batches, autocast, GradScaler, clipping, frozen/unused parameters, closures, hooks, copies.

Each test compares against a run of the same real model without the feature (measured here, in
the same process), never against hard-coded numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.checkpoint import checkpoint

from conftest import batches
from l2e_optim import L2EConfig, L2EWrapper
from l2e_optim._lab.zoo import PlainLM, tiny_gpt_neox

TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # CI shares 2 cores; also makes float sums reproducible
    yield
    torch.set_num_threads(before)


def config(**overrides: Any) -> L2EConfig:
    """Inhibition from the first step on, strong enough that its gradient shows in every check."""
    values: dict[str, Any] = {"warmup_steps": 0, "strength": 0.05, "ratio": 0.05, "forget_steps": None}
    values.update(overrides)
    return L2EConfig(**values)


def make(
    model: nn.Module | None = None, opt: str = "adamw", lr: float = 1e-2, **overrides: Any
) -> tuple[nn.Module, L2EWrapper]:
    model = PlainLM() if model is None else model
    base: torch.optim.Optimizer
    if opt == "adamw":
        base = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        base = torch.optim.SGD(model.parameters(), lr=lr)
    return model, L2EWrapper(base, model, config=config(**overrides))


def snapshot(opt: L2EWrapper) -> dict[str, Tensor]:
    """Every L2E tensor, including the private step accumulators, cloned."""
    out = {"step": opt.step_count.clone()}
    for name, site in opt.sites.items():
        for key, value in site.tensors().items():
            out[f"{name}.{key}"] = value.clone()
        out[f"{name}.accumulator"] = site.accumulator.clone()
    return out


def assert_states_close(a: dict[str, Tensor], b: dict[str, Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=lambda m, key=key: f"{key}: {m}", **tol)


def assert_params_close(a: nn.Module, b: nn.Module, **tol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}", **tol)


def grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def train_step(model: nn.Module, opt: L2EWrapper, batch: Tensor) -> None:
    model.loss(batch).backward()  # type: ignore[operator]
    opt.step()
    opt.zero_grad()


def data(corpus: Tensor, n: int, batch: int = 8, seq: int = 17, seed: int = 0) -> list[Tensor]:
    it = batches(corpus, batch, seq, seed)
    return [next(it) for _ in range(n)]


def inhibition_matters(corpus: Tensor) -> list[Tensor]:
    """Gradients of step 2 with strength 0: the L2E gradient must change them (checks are live)."""
    model, opt = make(strength=0.0)
    batch = data(corpus, 2)
    train_step(model, opt, batch[0])
    model.loss(batch[1]).backward()  # type: ignore[operator]
    return grads(model)


def assert_grads_differ(a: list[Tensor], b: list[Tensor]) -> None:
    assert any(not torch.allclose(x, y, **TOL) for x, y in zip(a, b)), "the L2E gradient had no effect"


# -- gradient accumulation -------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_concatenated_batch(corpus: Tensor, k: int) -> None:
    full_model, full = make()
    acc_model, acc = make(grad_accumulation_steps=k)
    for batch in data(corpus, 3):
        train_step(full_model, full, batch)
        before = snapshot(acc)
        for chunk in batch.chunk(k):
            (acc_model.loss(chunk) / k).backward()  # type: ignore[operator]
        after_backward = snapshot(acc)
        for key in before:  # backward only accumulates; nothing commits before step()
            if not key.endswith("accumulator"):
                assert torch.equal(before[key], after_backward[key]), key
        acc.step()
        acc.zero_grad()
        assert_states_close(snapshot(full), snapshot(acc), rtol=1e-5, atol=1e-5)
        assert_params_close(full_model, acc_model, rtol=1e-5, atol=1e-6)
    assert int(acc.step_count) == 3
    assert all(float(s.selected_fraction) > 0 for s in acc.sites.values()), "inhibition never ran"


# -- activation checkpointing ----------------------------------------------------------------------
class CheckpointedLM(PlainLM):
    """PlainLM whose blocks run under torch.utils.checkpoint (the forward runs again in backward)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_equals_plain_run(corpus: Tensor, reentrant: bool) -> None:
    plain_model, plain = make(opt="sgd", lr=0.1)
    ckpt_model, ckpt = make(CheckpointedLM(reentrant), opt="sgd", lr=0.1)
    forwards = {"n": 0}
    site = ckpt_model.blocks[1].mlp[2]
    site.register_forward_pre_hook(lambda *_: forwards.__setitem__("n", forwards["n"] + 1))
    for i, batch in enumerate(data(corpus, 3)):
        plain_model.loss(batch).backward()  # type: ignore[operator]
        ckpt_model.loss(batch).backward()  # type: ignore[operator]
        for g, h in zip(grads(plain_model), grads(ckpt_model)):
            torch.testing.assert_close(g, h, **TOL)
        if i == 1:
            assert_grads_differ(grads(ckpt_model), inhibition_matters(corpus))
        for opt in (plain, ckpt):
            opt.step()
            opt.zero_grad()
        assert_states_close(snapshot(plain), snapshot(ckpt), **TOL)
    assert forwards["n"] == 6, "the checkpointed forward did not run twice per step"
    tokens = 3 * 8 * 16
    assert all(int(s.count) == tokens for s in ckpt.sites.values()), "a recomputed forward counted"


@pytest.mark.filterwarnings("ignore:.*is deprecated.*:FutureWarning")  # renamed in transformers 5
@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_equals_plain_run(corpus: Tensor, reentrant: bool) -> None:
    runs, forwards = [], []
    for enable in (False, True):
        model = tiny_gpt_neox(layers=4)
        model.train()
        if enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model, opt = make(model, opt="sgd", lr=0.1)
        site = model.gpt_neox.layers[1].mlp.dense_4h_to_h
        site.register_forward_pre_hook(lambda *_: forwards.append(enable))
        history = []
        for batch in data(corpus, 2, batch=4, seq=16):
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            history.append(grads(model))
            opt.step()
            opt.zero_grad()
            history.append(list(snapshot(opt).values()))
        runs.append(history)
    for plain, ckpt in zip(*runs):
        for a, b in zip(plain, ckpt):
            torch.testing.assert_close(a, b, **TOL)
    assert int(runs[1][-1][0]) == 2  # the step count
    assert forwards.count(True) == 2 * forwards.count(False) == 4, "checkpointing did not recompute"


# -- eval, no_grad, inference_mode, paused -----------------------------------------------------------
@pytest.mark.parametrize("inhibition", ["l2e", "memel"])
@pytest.mark.parametrize("mode", ["eval", "no_grad", "inference_mode", "paused"])
def test_evaluation_leaves_l2e_state_unchanged(corpus: Tensor, mode: str, inhibition: str) -> None:
    model, opt = make(inhibition=inhibition)
    train, probe = data(corpus, 2)
    train_step(model, opt, train)
    model.loss(train).backward()  # type: ignore[operator]  # a half-gathered step in progress
    before = snapshot(opt)
    with opt.paused():
        reference = model(probe).detach()
    if mode == "eval":
        model.eval()
        out = model(probe)
        model.loss(probe).backward()  # type: ignore[operator]  # eval with grad: still nothing
        model.train()
    elif mode == "no_grad":
        with torch.no_grad():
            out = model(probe)
    elif mode == "inference_mode":
        with torch.inference_mode():
            out = model(probe)
    else:
        with opt.paused():
            out = model(probe)
            model.loss(probe).backward()  # type: ignore[operator]
    assert_states_close(before, snapshot(opt), rtol=0, atol=0)
    if inhibition == "memel" and mode in ("no_grad", "inference_mode"):
        # In train mode MEmeL's Reverse Deactivation rewrites the forward even without grad, like
        # dropout: reentrant checkpointing runs its first forward under no_grad, and that forward
        # must equal the recomputed one. Validation belongs under model.eval() (docs say so).
        assert not torch.equal(out.detach(), reference)
    else:
        torch.testing.assert_close(out.detach(), reference, rtol=0, atol=0)  # and no inhibition


# -- padding ---------------------------------------------------------------------------------------
def test_token_mask_equals_unpadded_sequences(corpus: Tensor) -> None:
    lengths = [12, 7, 9, 4]
    rows = data(corpus, 1, batch=len(lengths), seq=12)[0]
    seqs = [row[:n] for row, n in zip(rows, lengths)]
    mask = torch.tensor([[1] * n + [0] * (12 - n) for n in lengths])
    padded = torch.where(mask.bool(), rows, torch.zeros_like(rows))
    states = {}
    for how in ("unpadded", "masked", "unmasked", "hooked"):
        # lr = 0: the second step's selection runs on identical weights in every run
        model, opt = make(tiny_gpt_neox(layers=4), opt="sgd", lr=0.0)
        if how == "hooked":  # docs/training-loops.md: hand every forward's mask to the wrapper
            model.register_forward_pre_hook(
                lambda module, args, kwargs: opt.set_token_mask(kwargs.get("attention_mask")),
                with_kwargs=True,
            )
        for _ in range(2):
            if how == "unpadded":
                for seq in seqs:
                    model(input_ids=seq[None], labels=seq[None]).loss.backward()
            else:
                if how != "hooked":
                    opt.set_token_mask(mask if how == "masked" else None)
                model(input_ids=padded, attention_mask=mask, labels=padded).loss.backward()
            opt.step()
            opt.zero_grad()
        opt.set_token_mask(None)
        states[how] = snapshot(opt)
    assert_states_close(states["unpadded"], states["masked"], rtol=1e-5, atol=1e-6)
    assert_states_close(states["masked"], states["hooked"], rtol=0, atol=0)
    assert all(int(v) == 2 * sum(lengths) for k, v in states["masked"].items() if k.endswith(".count"))
    with pytest.raises(AssertionError):  # padding does change the statistics: the mask matters
        assert_states_close(states["unpadded"], states["unmasked"], rtol=1e-5, atol=1e-6)


def test_token_mask_of_wrong_size_is_a_clear_error(corpus: Tensor) -> None:
    model, opt = make()
    opt.set_token_mask(torch.ones(3, 5))
    with pytest.raises(ValueError, match="set_token_mask"):
        model.loss(data(corpus, 1)[0])  # type: ignore[operator]


# -- non-finite micro-batches ----------------------------------------------------------------------
def poison(model: nn.Module) -> Callable[[], None]:
    """Make block 1's MLP hidden activation non-finite in the next forward (as an overflow would)."""

    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        handle.remove()
        bad = torch.zeros_like(output)
        bad[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        return output + bad

    handle = model.blocks[1].mlp[1].register_forward_hook(hook)  # type: ignore[index]
    return handle.remove


@pytest.mark.parametrize("clean_too", [True, False])
def test_nonfinite_microbatch_is_skipped_and_counted(corpus: Tensor, clean_too: bool) -> None:
    first, clean, bad = data(corpus, 3)
    ref_model, ref = make(opt="sgd", lr=0.0)
    model, opt = make(opt="sgd", lr=0.0)
    for m, o in ((ref_model, ref), (model, opt)):
        train_step(m, o, first)  # statistics exist, so inhibition is live in the next step
    if clean_too:
        ref_model.loss(clean).backward()  # type: ignore[operator]
        model.loss(clean).backward()  # type: ignore[operator]
    poison(model)
    model.loss(bad).backward()  # type: ignore[operator]
    assert not all(torch.isfinite(g).all() for g in grads(model))  # the loss really went non-finite
    opt.base_optimizer.zero_grad()  # the loop drops the non-finite gradients (GradScaler would)
    for o in (ref, opt):
        o.step()
        o.zero_grad()
    got, want = snapshot(opt), snapshot(ref)
    for key in want:
        if key.endswith("nonfinite"):
            expected = 1 if key.startswith(("blocks.1.", "blocks.2.")) else 0
            assert int(got[key]) == expected, key  # block 2 sees block 1's NaN via the residual
        else:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
        assert torch.isfinite(got[key].float()).all(), key
    metrics = opt.metrics()
    assert metrics["l2e/blocks.1.mlp.2/nonfinite_microbatches"] == 1.0


def test_hooks_and_step_never_synchronise_with_the_host(corpus: Tensor) -> None:
    """On the meta device any data-dependent host read (item, bool, nonzero) raises."""
    with pytest.raises(RuntimeError):  # the probe can fail: a sync on meta is an error
        torch.ones((), device="meta").item()
    batch = data(corpus, 1)[0].to("meta")
    for inhibition in ("l2e", "memel"):
        model = PlainLM().to("meta")
        model, opt = make(model, opt="sgd", inhibition=inhibition, grad_accumulation_steps=2)
        opt.set_token_mask(torch.ones(8, 16, device="meta"))
        for _ in range(2):
            for chunk in batch.chunk(2):
                opt.set_token_mask(torch.ones(4, 16, device="meta"))
                (model.loss(chunk) / 2).backward()  # type: ignore[operator]
            opt.step()
            opt.zero_grad()
        assert opt.step_count.device.type == "meta"


# -- mixed precision -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_statistics_fp32(corpus: Tensor, dtype: torch.dtype) -> None:
    ref_model, ref = make(opt="sgd", lr=0.1)
    model, opt = make(opt="sgd", lr=0.1)
    seen: list[torch.dtype] = []
    model.blocks[1].mlp[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    for batch in data(corpus, 2):
        train_step(ref_model, ref, batch)
        with torch.autocast("cpu", dtype=dtype):
            loss = model.loss(batch)  # type: ignore[operator]
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert seen and all(d == dtype for d in seen), "the site did not see low-precision activations"
    state, want = snapshot(opt), snapshot(ref)
    for key, value in state.items():
        assert value.dtype == want[key].dtype, key  # fp32 statistics, int64 counts
    for key in ("mean", "var", "count"):
        for name in opt.sites:
            # a few ulps of the activation dtype apart from the fp32 run
            torch.testing.assert_close(state[f"{name}.{key}"], want[f"{name}.{key}"], rtol=0.05, atol=0.02)


def scaled_run(corpus: Tensor, scaler: torch.amp.GradScaler | None, register: bool) -> tuple[nn.Module, L2EWrapper]:
    model, opt = make(opt="adamw", lr=1e-2)
    if register:
        opt.set_grad_scaler(scaler)
    for batch in data(corpus, 3):
        loss = model.loss(batch)  # type: ignore[operator]
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        else:  # the documented usage: the same wrapper object to unscale_ and step
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    return model, opt


def test_grad_scaler_gives_the_unscaled_update(corpus: Tensor) -> None:
    ref_model, ref = scaled_run(corpus, None, register=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model, opt = scaled_run(corpus, scaler, register=True)
    assert int(opt.step_count) == 3
    assert_params_close(ref_model, model, rtol=1e-4, atol=1e-5)
    assert_states_close(snapshot(ref), snapshot(opt), rtol=1e-4, atol=1e-5)
    # Unregistered, the L2E gradient arrives divided by the scale: a different update.
    bad_model, _ = scaled_run(corpus, torch.amp.GradScaler("cpu", init_scale=2.0**12), register=False)
    with pytest.raises(AssertionError):
        assert_params_close(ref_model, bad_model, rtol=1e-4, atol=1e-5)


def test_grad_scaler_skipped_step_commits_nothing(corpus: Tensor) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, opt = make()
    opt.set_grad_scaler(scaler)
    first, skipped, after = data(corpus, 3)
    for batch, overflow in ((first, False), (skipped, True), (after, False)):
        before, params = snapshot(opt), [p.detach().clone() for p in model.parameters()]
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model.loss(batch)  # type: ignore[operator]
        scaler.scale(loss).backward()
        if overflow:
            model.head.bias.grad[0] = float("inf")  # type: ignore[index, union-attr]
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if overflow:
            assert_states_close(before, snapshot(opt), rtol=0, atol=0)
            for p, q in zip(params, model.parameters()):
                assert torch.equal(p, q)
            assert float(scaler.get_scale()) == 2.0**9
    assert int(opt.step_count) == 2
    assert all(int(s.count) == 2 * 8 * 16 for s in opt.sites.values())


# -- clipping --------------------------------------------------------------------------------------
def test_clipping_sees_the_inhibition_gradient(corpus: Tensor) -> None:
    model, opt = make(opt="sgd", lr=0.1)
    first, second = data(corpus, 2)
    train_step(model, opt, first)
    model.loss(second).backward()  # type: ignore[operator]
    with_l2e = grads(model)
    assert_grads_differ(with_l2e, inhibition_matters(corpus))  # the L2E gradient is in .grad
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in with_l2e]))
    params = [p.detach().clone() for p in model.parameters()]
    returned = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float(norm) / 2)
    torch.testing.assert_close(returned, norm)
    opt.step()
    for p, q, g in zip(params, model.parameters(), with_l2e):
        torch.testing.assert_close(q, p - 0.1 * g / 2, rtol=1e-5, atol=1e-6)


# -- parameters: frozen, unused, added later ---------------------------------------------------------
def test_frozen_layers_stay_frozen_and_sites_still_gather(corpus: Tensor) -> None:
    model = PlainLM()
    frozen = list(model.embed.parameters()) + list(model.blocks[0].parameters())
    for p in frozen:
        p.requires_grad_(False)
    saved = [p.clone() for p in frozen]
    model, opt = make(model)
    for batch in data(corpus, 3):
        train_step(model, opt, batch)
    for p, q in zip(frozen, saved):
        assert p.grad is None and torch.equal(p, q) and p not in opt.state
    assert all(int(s.count) == 3 * 8 * 16 for s in opt.sites.values())


def test_site_with_everything_before_it_frozen_gathers_nothing(corpus: Tensor) -> None:
    """Documented limitation: no backward reaches the tap, and nothing upstream could be inhibited."""
    model = PlainLM()
    for p in [*model.embed.parameters(), *model.blocks[:2].parameters()]:
        p.requires_grad_(False)
    model, opt = make(model)
    train_step(model, opt, data(corpus, 1)[0])
    assert int(opt.sites["blocks.1.mlp.2"].count) == 0
    assert int(opt.sites["blocks.2.mlp.2"].count) == 8 * 16


def test_parameters_without_grad_are_untouched(corpus: Tensor) -> None:
    model = PlainLM()
    model.unused = nn.Linear(4, 4)  # in the optimizer, never in the forward
    model, opt = make(model)
    saved = model.unused.weight.detach().clone()
    first, second = data(corpus, 2)
    train_step(model, opt, first)
    model.loss(second).backward()  # type: ignore[operator]
    model.head.weight.grad = None  # a loop may drop a gradient by hand
    head = model.head.weight.detach().clone()
    head_state = {k: v.clone() for k, v in opt.state[model.head.weight].items()}
    opt.step()
    assert torch.equal(model.unused.weight, saved) and model.unused.weight not in opt.state
    assert torch.equal(model.head.weight, head)
    for key, value in head_state.items():
        assert torch.equal(opt.state[model.head.weight][key], value)


def test_add_param_group_trains_the_new_group(corpus: Tensor) -> None:
    model = PlainLM()
    base = torch.optim.AdamW(model.blocks.parameters(), lr=1e-2)
    opt = L2EWrapper(base, model, config=config())
    first, second = data(corpus, 2)
    train_step(model, opt, first)
    head = model.head.weight.detach().clone()
    opt.add_param_group({"params": list(model.head.parameters()), "lr": 1e-3})
    assert opt.param_groups is base.param_groups and len(opt.param_groups) == 2
    train_step(model, opt, second)
    assert not torch.equal(model.head.weight, head)
    assert model.head.weight in opt.state and int(opt.step_count) == 2


# -- closure, hooks, copies ------------------------------------------------------------------------
def test_step_with_closure_equals_plain_loop(corpus: Tensor) -> None:
    ref_model, ref = make()
    model, opt = make()
    calls = []
    for batch in data(corpus, 2):
        train_step(ref_model, ref, batch)

        def closure(batch: Tensor = batch) -> Tensor:
            calls.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = model.loss(batch)  # type: ignore[operator]
            loss.backward()
            return loss

        with torch.no_grad():  # step() turns grad on for the closure
            loss = opt.step(closure)
        assert isinstance(loss, Tensor) and loss.ndim == 0
    assert calls == [True, True]
    assert_params_close(ref_model, model, **TOL)
    assert_states_close(snapshot(ref), snapshot(opt), **TOL)


def test_step_and_state_dict_hooks_fire(corpus: Tensor) -> None:
    model, opt = make()
    seen: list[tuple[str, int]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", int(o.step_count))))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", int(o.step_count))))
    opt.register_state_dict_pre_hook(lambda o: seen.append(("sd_pre", 0)))

    def sd_post(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        seen.append(("sd_post", int("l2e" in sd)))
        return sd

    opt.register_state_dict_post_hook(sd_post)
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(("load_pre", int("l2e" in sd))))
    opt.register_load_state_dict_post_hook(lambda o: seen.append(("load_post", int(o.step_count))))
    train_step(model, opt, data(corpus, 1)[0])
    opt.load_state_dict(opt.state_dict())
    assert seen == [("pre", 0), ("post", 1), ("sd_pre", 0), ("sd_post", 1), ("load_pre", 1), ("load_post", 1)]


def test_deepcopy_of_the_wrapper_is_independent(corpus: Tensor) -> None:
    model, opt = make()
    first, second = data(corpus, 2)
    train_step(model, opt, first)
    clone = copy.deepcopy(opt)
    frozen = snapshot(clone)
    assert_states_close(frozen, snapshot(opt), rtol=0, atol=0)
    for name, site in clone.sites.items():
        assert site.mean.data_ptr() != opt.sites[name].mean.data_ptr()
    train_step(model, opt, second)
    assert int(opt.step_count) == 2
    assert_states_close(frozen, snapshot(clone), rtol=0, atol=0)  # the model's hooks feed the original
    assert "l2e" in clone.state_dict()


@pytest.mark.parametrize("kind", ["averaged_model", "deepcopy"])
def test_model_copies_never_write_live_statistics(corpus: Tensor, kind: str) -> None:
    model, opt = make()
    first, probe, second = data(corpus, 3)
    train_step(model, opt, first)
    shadow: nn.Module
    if kind == "averaged_model":
        shadow = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        shadow.update_parameters(model)
        run: Callable[[Tensor], Tensor] = lambda b: shadow.module.loss(b)  # type: ignore[operator]
    else:
        shadow = copy.deepcopy(model)
        run = lambda b: shadow.loss(b)  # type: ignore[operator]  # noqa: E731
    before = snapshot(opt)
    shadow.train()
    run(probe).backward()
    assert_states_close(before, snapshot(opt), rtol=0, atol=0)
    train_step(model, opt, second)  # the live model still feeds the live statistics
    assert int(opt.step_count) == 2 and all(int(s.count) == 2 * 8 * 16 for s in opt.sites.values())


def test_state_tensors_keep_storage_shape_and_dtype(corpus: Tensor) -> None:
    model, opt = make()

    def layout() -> list[tuple[int, torch.Size, torch.dtype]]:
        tensors = [opt.step_count] + [t for s in opt.sites.values() for t in (*s.tensors().values(), s.accumulator)]
        return [(t.data_ptr(), t.shape, t.dtype) for t in tensors]

    start = layout()
    batch_list = data(corpus, 3)
    for batch in batch_list:
        train_step(model, opt, batch)
        assert layout() == start
    opt.load_state_dict(opt.state_dict())
    assert layout() == start
