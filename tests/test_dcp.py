"""The L2E state through torch.distributed.checkpoint: get/set_optimizer_state_dict, dcp.save/load.

Distributed parts run 2 real gloo processes (the harness of test_distributed.py); the 1-process
loads run here, in the test process, into a plain model: resharding from 2 shards to none.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pathlib
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from l2e_optim import CheckpointError, L2EWrapper, load_checkpoint
from test_distributed import (
    CONFIG,
    FSDP_STEPS,
    RESUME_STEPS,
    WORLD,
    fsdp_model,
    full_params,
    global_batches,
    l2e_state,
    launch,
    odd_lm,
    odd_loss,
    train,
)

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)  # torchtitan's layout
DATA = pathlib.Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))  # make_layout1: the model of the layout-1 files


def adamw_opt(model: nn.Module) -> L2EWrapper:
    # AdamW: under FSDP2 its state mixes DTensors (exp_avg) and plain tensors (step), as L2E's does.
    return L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), model, config=CONFIG)


def dcp_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What a DCP user saves, and loads into: the model's and the optimizer's state dicts."""
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def dcp_restore(path: pathlib.Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    state = dcp_state(model, opt)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def round_trip(rank: int, out: pathlib.Path, tag: str, build: Any) -> dict[str, Any]:
    """Train, dcp.save, train on; then a fresh model (another init) loads and trains the same."""
    model, opt = build(0)
    train(model, opt, odd_loss, global_batches(FSDP_STEPS), rank, WORLD)
    saved = {"l2e": l2e_state(opt, strip="module."), "step": opt.step_count.clone()}
    dcp.save(dcp_state(model, opt), checkpoint_id=str(out / tag))
    later = global_batches(RESUME_STEPS, skip=FSDP_STEPS)
    train(model, opt, odd_loss, later, rank, WORLD)
    continued = {"l2e": l2e_state(opt), "params": full_params(model)}
    model, opt = build(1)
    template = dcp_state(model, opt)  # on a fresh wrapper: DCP steps it once at lr 0
    untouched = int(opt.step_count) == 0 and all(int(s.count) == 0 for s in opt.sites.values())
    dcp.load(template, checkpoint_id=str(out / tag))
    set_model_state_dict(model, template["model"])
    set_optimizer_state_dict(model, opt, template["optim"])
    loaded = {"l2e": l2e_state(opt, strip="module."), "step": opt.step_count.clone()}
    train(model, opt, odd_loss, later, rank, WORLD)
    resumed = {"l2e": l2e_state(opt), "params": full_params(model)}
    return {"saved": saved, "loaded": loaded, "continued": continued, "resumed": resumed, "untouched": untouched}


def fsdp_build(seed: int) -> tuple[nn.Module, L2EWrapper]:
    model = fsdp_model(seed)
    return model, adamw_opt(model)


def ddp_build(seed: int) -> tuple[nn.Module, L2EWrapper]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(odd_lm(seed=seed))
    return model, adamw_opt(model)


class FlatOptimizers(Stateful):
    """What torchtitan's ``OptimizersContainer`` does (docs/distributed.md), without torchtitan:
    a ``Stateful`` whose state dict is the flat, FQN-keyed optimizer state (``state.<fqn>.<key>``),
    which DCP saves, reshards and loads. The load is the recipe's: base part, then L2E records."""

    def __init__(self, model: nn.Module, opt: L2EWrapper) -> None:
        self.model, self.opt = model, opt

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.opt, options=FLAT)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.opt.load_flat_l2e_state(state_dict)  # validated; the unflattening below drops them
        set_optimizer_state_dict(self.model, self.opt.base_optimizer, state_dict, options=FLAT)


def stateful_round_trip(rank: int, out: pathlib.Path) -> dict[str, Any]:
    """FSDP2 through a Stateful container, saved and loaded the way torchtitan's checkpointer does."""
    model, opt = fsdp_build(0)
    train(model, opt, odd_loss, global_batches(FSDP_STEPS), rank, WORLD)
    saved = {"l2e": l2e_state(opt), "step": opt.step_count.clone()}
    dcp.save({"model": get_model_state_dict(model), "optimizer": FlatOptimizers(model, opt)}, checkpoint_id=str(out / "flat"))
    later = global_batches(RESUME_STEPS, skip=FSDP_STEPS)
    train(model, opt, odd_loss, later, rank, WORLD)
    continued = {"l2e": l2e_state(opt), "params": full_params(model)}
    model, opt = fsdp_build(1)
    states = {"model": get_model_state_dict(model), "optimizer": FlatOptimizers(model, opt)}
    dcp.load(states, checkpoint_id=str(out / "flat"))  # calls the Stateful's load_state_dict
    set_model_state_dict(model, states["model"])
    loaded = {"l2e": l2e_state(opt), "step": opt.step_count.clone()}
    train(model, opt, odd_loss, later, rank, WORLD)
    resumed = {"l2e": l2e_state(opt), "params": full_params(model)}
    return {"saved": saved, "loaded": loaded, "continued": continued, "resumed": resumed, "untouched": True}


def dcp_job(rank: int, out: pathlib.Path) -> dict[str, Any]:
    return {
        "fsdp": round_trip(rank, out, "fsdp", fsdp_build),
        "ddp": round_trip(rank, out, "ddp", ddp_build),
        "stateful": stateful_round_trip(rank, out),
    }


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("dcp")
    return out, launch(dcp_job, out)


def assert_bytes_equal(got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every site's tensors, byte for byte (dtype and shape included)."""
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys()
        for key, value in want[name].items():
            mine = got[name][key]
            assert mine.dtype == value.dtype and mine.shape == value.shape, f"{name}.{key}"
            assert mine.numpy().tobytes() == value.numpy().tobytes(), f"{name}.{key}"


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["fsdp", "ddp", "stateful"])
def test_dcp_round_trip_on_two_ranks_is_exact(
    dcp_run: tuple[pathlib.Path, list[dict[str, Any]]], parallel: str
) -> None:
    ranks = [rank[parallel] for rank in dcp_run[1]]
    for rank in ranks:
        assert rank["untouched"]  # building the load template did not step the fresh L2E state
        assert int(rank["loaded"]["step"]) == int(rank["saved"]["step"]) == FSDP_STEPS
        assert_bytes_equal(rank["loaded"]["l2e"], rank["saved"]["l2e"])
        assert_bytes_equal(rank["resumed"]["l2e"], rank["continued"]["l2e"])  # bit-identical continuation
        for name, value in rank["continued"]["params"].items():
            assert torch.equal(rank["resumed"]["params"][name], value), name
    assert_bytes_equal(ranks[0]["loaded"]["l2e"], ranks[1]["loaded"]["l2e"])
    assert any(float(s["selected_fraction"]) > 0 for s in ranks[0]["saved"]["l2e"].values())  # L2E was live


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_dcp_checkpoint_of_two_ranks_loads_on_one(
    dcp_run: tuple[pathlib.Path, list[dict[str, Any]]], parallel: str
) -> None:
    """Resharding: the 2-rank checkpoint (FSDP2 shards; DDP's ``module.`` names) into one plain process."""
    out, ranks = dcp_run
    model = odd_lm(seed=2)
    opt = adamw_opt(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP: no process group, loading without one
        dcp_restore(out / parallel, model, opt)
    saved = ranks[0][parallel]["saved"]
    assert int(opt.step_count) == FSDP_STEPS
    assert_bytes_equal(l2e_state(opt), saved["l2e"])
    # One process on the global batch continues as the 2 ranks did (up to summation order).
    train(model, opt, odd_loss, global_batches(RESUME_STEPS, skip=FSDP_STEPS))
    want = ranks[0][parallel]["continued"]
    for name, value in want["params"].items():
        torch.testing.assert_close(model.get_parameter(name.removeprefix("module.")), value, rtol=1e-4, atol=1e-5)
    for name, site in want["l2e"].items():
        assert torch.equal(opt.sites[name.removeprefix("module.")].count, site["count"])


# -- one process: layout, DCP's state-creating step, missing records --------------------------


def trained(opt_class: type[torch.optim.Optimizer] = torch.optim.AdamW, **kwargs: Any) -> tuple[nn.Module, L2EWrapper]:
    model = odd_lm()
    opt = L2EWrapper(opt_class(model.parameters(), lr=1e-2, **kwargs), model, config=CONFIG)
    train(model, opt, odd_loss, global_batches(3))
    return model, opt


def test_records_ride_in_the_site_weights_entries_never_in_the_live_state() -> None:
    model, opt = trained()
    out = opt.state_dict()
    pids = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    for name, site in opt.sites.items():
        record = out["state"][pids[f"{name}.weight"]]["l2e"]["sites"][name]
        for key, value in site.tensors().items():
            assert torch.equal(record[key], value) and record[key] is not value  # a copy
        assert torch.equal(record["step"], opt.step_count)
    assert out["l2e"] == {"format_version": 2, "config": CONFIG.to_dict()}
    assert all("l2e" not in entry for entry in opt.base_optimizer.state.values())
    opt.load_state_dict(out)
    assert all("l2e" not in entry for entry in opt.base_optimizer.state.values())


def test_dcp_get_keeps_the_records_under_fqns() -> None:
    model, opt = trained()
    state = get_optimizer_state_dict(model, opt)
    assert "l2e" not in state  # DCP keeps "state" and "param_groups" only ...
    for name in opt.sites:  # ... and the records ride with the FQN-keyed entries
        assert name in state["state"][f"{name}.weight"]["l2e"]["sites"]


@pytest.mark.parametrize("fresh", [True, False])
def test_dcp_state_creating_step_leaves_l2e_alone(fresh: bool) -> None:
    """DCP steps an optimizer without state at lr 0 (``_init_optim_state``); plain SGD never has
    state, so that happens at every save. The L2E state must not move (it counted a step)."""
    if fresh:
        model = odd_lm()
        opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model, config=CONFIG)
    else:
        model, opt = trained(torch.optim.SGD)
        opt.zero_grad()
    before = copy.deepcopy(l2e_state(opt)), int(opt.step_count)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        get_optimizer_state_dict(model, opt)
    assert int(opt.step_count) == before[1]
    assert_bytes_equal(l2e_state(opt), before[0])
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_a_stateless_base_goes_through_dcp() -> None:
    """Plain SGD keeps no state: the records would be the only entries, and DCP's strict load
    wants one for every trainable parameter once any exists (empty ones are added, and dropped)."""
    model, opt = trained(torch.optim.SGD)
    assert not opt.base_optimizer.state
    target_model = odd_lm(seed=1)
    target = L2EWrapper(torch.optim.SGD(target_model.parameters(), lr=1e-2), target_model, config=CONFIG)
    set_optimizer_state_dict(target_model, target, get_optimizer_state_dict(model, opt))
    assert_bytes_equal(l2e_state(target), l2e_state(opt))
    assert not target.base_optimizer.state  # the empty entries did not reach the base


def test_a_real_step_at_lr_zero_still_counts() -> None:
    """Warm-up from lr 0: the step saw tokens, so it is a step (only the empty one is skipped)."""
    model = odd_lm()
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.0), model, config=CONFIG)
    train(model, opt, odd_loss, global_batches(2))
    assert int(opt.step_count) == 2


def test_dcp_load_without_records_is_an_error_unless_reset(tmp_path: pathlib.Path) -> None:
    model, opt = trained()
    plain_model = odd_lm()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    train(plain_model, plain, odd_loss, global_batches(1))
    plain_state = get_optimizer_state_dict(plain_model, plain)
    before = copy.deepcopy(l2e_state(opt))
    with pytest.raises(CheckpointError, match="no L2E entries"):
        set_optimizer_state_dict(model, opt, plain_state)
    assert_bytes_equal(l2e_state(opt), before)
    opt.reset_l2e_state()
    set_optimizer_state_dict(model, opt, plain_state)
    assert int(opt.step_count) == 0 and all(int(s.count) == 0 for s in opt.sites.values())


def test_flat_state_dict_loads_through_load_flat_l2e_state() -> None:
    """torchtitan's path: flatten_optimizer_state_dict=True drops keys the live base state
    lacks on load, so the records come back by name."""
    flat = FLAT
    model, opt = trained()
    saved = get_optimizer_state_dict(model, opt, options=flat)
    assert any(".l2e.sites." in key for key in saved)
    target_model = odd_lm(seed=1)
    target = adamw_opt(target_model)
    with pytest.raises(CheckpointError, match="load_flat_l2e_state"):
        set_optimizer_state_dict(target_model, target, saved, options=flat)
    set_optimizer_state_dict(target_model, target.base_optimizer, saved, options=flat)
    target.load_flat_l2e_state(saved)
    assert_bytes_equal(l2e_state(target), l2e_state(opt))
    assert int(target.step_count) == int(opt.step_count)


# -- layout 1 (one top-level "l2e" entry), as files written before layout 2 ----------------------


def test_layout_1_files_still_load() -> None:
    """tests/data/layout1.* were written by l2e_optim before layout 2 (data/make_layout1.py)."""
    layout1 = importlib.import_module("make_layout1")
    model, opt = layout1.build()
    load_checkpoint(DATA / "layout1.safetensors", opt, model=model)
    with safe_open(str(DATA / "layout1.safetensors"), framework="pt") as file:
        assert file.metadata()["optimizer.l2e"].startswith('{"format_version": 1')
        for name, site in opt.sites.items():
            for key, value in site.tensors().items():
                assert torch.equal(value, file.get_tensor(f"optimizer.l2e.sites.{name}.{key}")), (name, key)
        assert torch.equal(opt.step_count, file.get_tensor("optimizer.l2e.step"))
    assert int(opt.step_count) == 3
    legacy = torch.load(DATA / "layout1.pt", weights_only=True)
    assert legacy["l2e"]["format_version"] == 1
    _, fresh = layout1.build()
    fresh.load_state_dict(legacy)
    assert_bytes_equal(l2e_state(fresh), l2e_state(opt))
    assert any("l2e" in entry for entry in fresh.state_dict()["state"].values())  # saved in layout 2


def test_an_unknown_layout_is_refused_with_the_fix() -> None:
    model, opt = trained()
    out = opt.state_dict()
    out["l2e"] = {**out["l2e"], "format_version": 7}
    with pytest.raises(CheckpointError, match="format_version: 7 is not a supported version.*release that saved it"):
        opt.load_state_dict(out)


def test_per_position_statistics_go_through_dcp(tmp_path: pathlib.Path) -> None:
    config = dataclasses.replace(CONFIG, statistics="per-position", max_positions=8)
    model = odd_lm()
    opt = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), model, config=config)
    train(model, opt, odd_loss, global_batches(3))
    saved = copy.deepcopy(l2e_state(opt))
    dcp.save(dcp_state(model, opt), checkpoint_id=str(tmp_path / "ckpt"))
    fresh = odd_lm(seed=1)
    restored = L2EWrapper(torch.optim.AdamW(fresh.parameters(), lr=1e-2), fresh, config=config)
    dcp_restore(tmp_path / "ckpt", fresh, restored)
    assert all(site.rows == 9 for site in restored.sites.values())
    assert_bytes_equal(l2e_state(restored), saved)
