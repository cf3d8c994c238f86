"""Validate, then load, for real: every file that the model, optimizer or scheduler would refuse,
half-load or be ruined by is refused with CheckpointError, and nothing changes (issue 15, items 2
and 4). Uses test_checkpoint's real tiny GPT-NeoX runs and files."""

from __future__ import annotations

import json
import math
import os
import pathlib
import stat
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from l2e_optim import CheckpointError, L2EConfig, L2EWrapper, load_checkpoint, save_checkpoint
from l2e_optim._lab.zoo import tiny_gpt_neox
from conftest import assert_identical
from test_checkpoint import (  # noqa: F401  (good is a fixture)
    CASES,
    STAT,
    Run,
    _clone,
    build,
    data,
    good,
    rewrite,
    snapshot,
    train,
)

Edit = Callable[[dict[str, Tensor], dict[str, str]], None]


def _meta(key: str, change: Callable[[Any], Any]) -> Edit:
    def edit(tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
        meta[key] = json.dumps(change(json.loads(meta[key])))

    return edit


def _group(field: str, value: Any) -> Edit:
    def change(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        groups[0][field] = value
        return groups

    return _meta("optimizer.param_groups", change)


def _tensor(key: str, change: Callable[[Tensor], Tensor]) -> Edit:
    def edit(tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
        tensors[key] = change(tensors[key].clone())

    return edit


def _nested(depth: int) -> Edit:
    def edit(tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
        meta["optimizer.extra"] = "[" * depth + "]" * depth

    return edit


def _scheduler(field: str, value: Any) -> Edit:
    def change(state: dict[str, Any]) -> dict[str, Any]:
        state[field] = value
        return state

    return _meta("scheduler", change)


NAN, INF = float("nan"), float("inf")
EXP_AVG_SQ = "optimizer.state.0.exp_avg_sq"
CASES_2_AND_4: list[tuple[str, Edit, str]] = [
    # 2. escaped as TypeError / ValueError / KeyError / NotImplementedError / RecursionError
    ("user-list", lambda t, m: m.update({"user": "[1, 2]"}), "user: the metadata is a JSON list"),
    ("user-number", lambda t, m: m.update({"user": "5"}), "user: the metadata is a JSON int"),
    ("user-null", lambda t, m: m.update({"user": "null"}), "user: the metadata is a JSON NoneType"),
    ("lr-lambdas", _scheduler("lr_lambdas", [5]), "scheduler.lr_lambdas.0: a int, the scheduler has a NoneType"),
    ("float8-state", _tensor("optimizer.state.0.exp_avg", lambda v: v.to(torch.float8_e4m3fn)), "exp_avg: dtype torch.float8"),
    ("param-ids-as-lists", _meta("optimizer.param_groups", lambda g: [dict(x, params=[[i] for i in x["params"]]) for x in g]), "parameter ids must be integers"),
    ("nested-600", _nested(600), "nested more than"),
    # 4. passed validation and ruined training
    ("lr-nan", _group("lr", NAN), "param_groups.0.lr: nan is not finite"),
    ("weight-decay-inf", _group("weight_decay", INF), "param_groups.0.weight_decay: inf is not finite"),
    ("betas-nan", _group("betas", {"__tuple__": [NAN, 0.999]}), "param_groups.0.betas: nan"),
    ("betas-one", _group("betas", {"__tuple__": [0.9, 1.5]}), "param_groups.0.betas: 1.5 is not in [0, 1)"),
    ("lr-negative", _group("lr", -1.0), "param_groups.0.lr: -1.0 is negative"),
    ("base-lrs-nan", _scheduler("base_lrs", [NAN]), "scheduler.base_lrs.0: nan"),
    ("last-epoch-float", _scheduler("last_epoch", -1e30), "scheduler.last_epoch: a float"),
    ("last-epoch-negative", _scheduler("last_epoch", -7), "scheduler.last_epoch: -7.0 is below -1"),
    ("exp-avg-sq-negative", _tensor(EXP_AVG_SQ, lambda v: -v - 1), "exp_avg_sq: contains negative"),
    ("exp-avg-sq-zero", _tensor(EXP_AVG_SQ, lambda v: v.zero_()), "exp_avg: exceeds"),
    ("exp-avg-huge", _tensor("optimizer.state.0.exp_avg", lambda v: v.fill_(1e30)), "exp_avg: exceeds"),
    ("dtype-relabelled", _tensor("optimizer.state.0.exp_avg", lambda v: v.view(torch.int32)), "exp_avg: dtype torch.int32"),
    ("l2e-mean-1e30", _tensor(f"{STAT}.mean", lambda v: v.fill_(1e30)), f"{STAT}.mean: values above"),
    ("threshold-0", _tensor(f"{STAT}.threshold", lambda v: v.zero_()), f"{STAT}.threshold: values below"),
    ("count-near-int64-max", _tensor(f"{STAT}.count", lambda v: v.fill_(2**63 - 10)), f"{STAT}.count: values above"),
    ("selected-fraction-2", _tensor(f"{STAT}.selected_fraction", lambda v: v.fill_(2.0)), "selected_fraction: values above"),
    ("step-near-int64-max", _tensor(f"{STAT}.step", lambda v: v.fill_(2**63 - 1)), f"{STAT}.step: values above"),
    ("twice-referred", _meta("optimizer.state", lambda s: _alias(s)), "referred to twice"),
]


def _alias(skeleton: dict[str, Any]) -> dict[str, Any]:
    """Point exp_avg_sq at exp_avg's tensor (the two would share storage)."""
    entry = skeleton["__items__"][0][1]
    entry["exp_avg_sq"] = entry["exp_avg"]
    return skeleton


@pytest.mark.parametrize("edit, expected", [c[1:] for c in CASES_2_AND_4], ids=[c[0] for c in CASES_2_AND_4])
def test_refused_with_everything_unchanged(
    good: tuple[pathlib.Path, Run], edit: Edit, expected: str, tmp_path: pathlib.Path
) -> None:
    path, target = good
    bad = tmp_path / "bad.safetensors"
    rewrite(edit)(path, bad)
    before = snapshot(target)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(bad, target.opt, model=target.model, scheduler=target.sched)
    assert str(error.value).startswith(f"{bad}: ") and expected in str(error.value), str(error.value)
    assert_identical(snapshot(target), before)


def _plateau_run(seed: int) -> Run:
    run = build(CASES[0], seed=seed)
    return Run(run.model, run.opt, torch.optim.lr_scheduler.ReduceLROnPlateau(run.opt))  # type: ignore[arg-type]


def test_a_scheduler_state_the_scheduler_rejects(tmp_path: pathlib.Path) -> None:
    source = _plateau_run(0)
    path, bad = tmp_path / "p.safetensors", tmp_path / "bad.safetensors"
    save_checkpoint(path, source.opt, model=source.model, scheduler=source.sched)
    rewrite(_scheduler("mode", "bogus"))(path, bad)
    target = _plateau_run(1)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="ReduceLROnPlateau refuses this state"):
        load_checkpoint(bad, target.opt, model=target.model, scheduler=target.sched)
    assert_identical(snapshot(target), before)


def _sgd_run(seed: int) -> Run:
    model = tiny_gpt_neox(seed=seed)
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, config=L2EConfig(warmup_steps=2))
    return Run(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0))


def test_another_optimizers_file_or_state_dict_is_refused(good: tuple[pathlib.Path, Run], tmp_path: pathlib.Path) -> None:
    """An SGD wrapper's file into an AdamW wrapper (KeyError 'step' half-way), and the reverse."""
    sgd = _sgd_run(0)
    train(sgd, data(2))
    path = tmp_path / "sgd.safetensors"
    save_checkpoint(path, sgd.opt, model=sgd.model, scheduler=sgd.sched)
    _, adamw = good
    before = snapshot(adamw)
    with pytest.raises(CheckpointError, match="lacks \\['amsgrad', 'betas', 'eps'\\].*another optimizer"):
        load_checkpoint(path, adamw.opt, model=adamw.model, scheduler=adamw.sched)
    with pytest.raises(CheckpointError, match="another optimizer"):
        adamw.opt.load_state_dict(_clone(sgd.opt.state_dict()))
    assert_identical(snapshot(adamw), before)
    sgd_before = snapshot(sgd)
    with pytest.raises(CheckpointError, match="another optimizer"):
        sgd.opt.load_state_dict(_clone(adamw.opt.state_dict()))
    assert_identical(snapshot(sgd), sgd_before)


def test_a_state_entry_lacking_a_key_the_optimizer_needs_is_refused(good: tuple[pathlib.Path, Run]) -> None:
    _, target = good
    state = _clone(target.opt.state_dict())
    del state["state"][0]["exp_avg"]
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="state.0: lacks \\['exp_avg'\\]"):
        target.opt.load_state_dict(state)
    assert_identical(snapshot(target), before)


@pytest.mark.parametrize("metadata", [{1: "a"}, {"nested": {2: "b"}}])
def test_user_metadata_with_non_string_keys_is_refused_at_save(metadata: dict[Any, Any], tmp_path: pathlib.Path) -> None:
    run = build(CASES[0], seed=0)
    with pytest.raises(CheckpointError, match="keys must be strings"):
        save_checkpoint(tmp_path / "c.safetensors", run.opt, metadata=metadata)
    assert not list(tmp_path.iterdir())


def test_threshold_init_outside_the_kept_range_is_a_config_error() -> None:
    from l2e_optim import ConfigError

    with pytest.raises(ConfigError, match="threshold_init"):
        L2EConfig(threshold_init=1e9)
    assert L2EConfig(ratio=0.9999).starting_threshold >= 1e-4  # the Gaussian quantile, clamped


def test_validation_runs_once_per_load(good: tuple[pathlib.Path, Run], monkeypatch: pytest.MonkeyPatch) -> None:
    """load_checkpoint validated the optimizer's state twice (its own plan, then load_state_dict)."""
    from l2e_optim._src import checkpoint, wrapper_state

    path, target = good
    calls: list[str] = []
    for module in (checkpoint, wrapper_state):
        for name in ("validate_base_state", "validate_l2e_state"):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    load_checkpoint(path, target.opt, model=target.model, scheduler=target.sched)
    assert sorted(calls) == ["validate_base_state", "validate_l2e_state"]


def test_a_flipped_data_byte_is_caught_by_the_checksum(good: tuple[pathlib.Path, Run], tmp_path: pathlib.Path) -> None:
    """0.1 -> 0.1000001 passes every value check; only a checksum can tell."""
    path, target = good
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # the low mantissa bits of the last tensor's last value
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(bad, target.opt, model=target.model, scheduler=target.sched)
    assert_identical(snapshot(target), before)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_the_file_mode_is_torch_saves_under_the_umask(umask: int, mode: int, tmp_path: pathlib.Path) -> None:
    run = build(CASES[0], seed=0)
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "c.safetensors", run.opt)
        torch.save({}, tmp_path / "t.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "c.safetensors").st_mode) == mode
    assert stat.S_IMODE(os.stat(tmp_path / "t.pt").st_mode) == mode


def _read_every_state_tensor(run: Run) -> None:
    snapshot(run)  # touches every byte of the state


def test_loaded_state_does_not_view_the_file(tmp_path: pathlib.Path) -> None:
    """The loaded tensors viewed the memory-mapped file: rewriting it in place (a copy over it,
    a truncation) then crashed training with SIGBUS. Checked in a forked child, which may crash."""
    import multiprocessing

    source = build(CASES[0], seed=0)
    train(source, data(2))
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, source.opt, model=source.model, scheduler=source.sched)
    target = build(CASES[0], seed=1)
    load_checkpoint(path, target.opt, model=target.model, scheduler=target.sched)
    with open(path, "r+b") as file:
        file.truncate(16)
    child = multiprocessing.get_context("fork").Process(target=_read_every_state_tensor, args=(target,))
    child.start()
    child.join()
    assert child.exitcode == 0, f"reading the loaded state crashed the process (exit code {child.exitcode})"


def _set_entry(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda state: state["state"][0].__setitem__(key, value)


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (_set_entry("exp_avg", "x"), "state.0.exp_avg: expected a tensor"),
        (_set_entry("exp_avg_sq", None), "state.0.exp_avg_sq: expected a tensor"),
        (_set_entry("step", -3.0), "state.0.step: -3.0 is not a finite value"),
        (lambda s: s["param_groups"][0].__setitem__("params", [[0]] * len(s["param_groups"][0]["params"])), "parameter ids"),
        (lambda s: s["param_groups"][0].__setitem__("lr", "fast"), "param_groups.0.lr: expected a number"),
        (lambda s: s["param_groups"][0].__setitem__("amsgrad", 1), "param_groups.0.amsgrad: expected a bool"),
        (lambda s: s["state"].__setitem__(10**6, {}), "state.1000000: state for a parameter id that no group lists"),
    ],
    ids=["tensor-as-str", "tensor-as-none", "negative-step", "ids-as-lists", "lr-str", "flag-int", "unlisted-id"],
)
def test_state_dicts_of_the_wrong_shape_are_refused_unchanged(
    good: tuple[pathlib.Path, Run], corrupt: Callable[[dict[str, Any]], None], expected: str
) -> None:
    _, target = good
    state = _clone(target.opt.state_dict())
    corrupt(state)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=expected):
        target.opt.load_state_dict(state)
    assert_identical(snapshot(target), before)


@pytest.mark.parametrize("dtype, slack", [(torch.float32, 1.0 + 1e-5), (torch.bfloat16, 4.0)])
@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.999)])
def test_the_adam_moment_bound_holds_in_training(dtype: torch.dtype, slack: float, betas: tuple[float, float]) -> None:
    """|m| <= c sqrt(v) is a theorem for fp32 moments; bf16 moments stay within the loader's 4c."""
    from l2e_optim._lab.zoo import PlainLM
    from l2e_optim._src.base_state import check_adam_moments

    model = PlainLM(seed=0).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=betas)
    b1, b2 = betas
    c = (1 - b1) / math.sqrt((1 - b2) * (1 - b1 * b1 / b2))
    worst = 0.0
    for ids in data(30):
        model.loss(ids).backward()
        opt.step()
        opt.zero_grad()
        for state in opt.state.values():
            m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
            ratio = m.abs() / v.sqrt().clamp_min(1e-30)
            worst = max(worst, float(ratio[v > 0].max()) if bool((v > 0).any()) else 0.0)
            check_adam_moments("state", state, betas)  # the loader accepts every state of the run
    assert worst <= slack * c, (worst, c)
