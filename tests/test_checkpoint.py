"""Checkpoints: bit-exact resume through safetensors and torch.save, bad files rejected with
the state untouched, atomic writes, no pickle on load, strict=False, plain-optimizer interop."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import pathlib
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from conftest import assert_identical, batches
from l2e_optim import CheckpointError, L2EConfig, L2EWrapper, load_checkpoint, save_checkpoint
from l2e_optim._lab.zoo import stdlib_bytes, tiny_gpt_neox, tiny_llama
from l2e_optim._src import checkpoint_io
from l2e_optim._src.checkpoint_io import checksum

torch.set_num_threads(1)
WARMUP, BEFORE, AFTER = 2, 4, 10


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype = torch.float32
    groups: int = 1
    inhibition: str = "l2e"
    statistics: str = "pooled"


CASES = [
    Case("fp32"),
    Case("bf16", dtype=torch.bfloat16),
    Case("two-groups", groups=2),
    Case("memel", inhibition="memel"),
    Case("none", inhibition="none"),
    # 24-token windows, 16 positions of their own: the tail row is exercised too.
    Case("per-position", statistics="per-position"),
    Case("memel-per-position", inhibition="memel", statistics="per-position"),
]


@dataclasses.dataclass
class Run:
    model: nn.Module
    opt: L2EWrapper
    sched: torch.optim.lr_scheduler.LRScheduler


def build(case: Case, seed: int, hidden: int = 32, **config: Any) -> Run:
    model = tiny_gpt_neox(hidden=hidden, seed=seed).to(case.dtype)
    if case.groups == 2:
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        vectors = [p for p in model.parameters() if p.dim() < 2]
        base = torch.optim.AdamW(
            [{"params": matrices}, {"params": vectors, "lr": 3e-3, "weight_decay": 0.0}], lr=1e-3
        )
    else:
        base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    settings: dict[str, Any] = {"inhibition": case.inhibition, "warmup_steps": WARMUP, "strength": 0.1,
                                "statistics": case.statistics, "max_positions": 16}
    opt = L2EWrapper(base, model, config=L2EConfig(**(settings | config)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: min(1.0, (epoch + 1) / 3))
    return Run(model, opt, sched)


def data(steps: int) -> list[Tensor]:
    source = batches(stdlib_bytes(40_000), 4, 24, seed=1)
    return [next(source) for _ in range(steps)]


def train(run: Run, inputs: list[Tensor]) -> None:
    for ids in inputs:
        run.model(ids, labels=ids).loss.backward()
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad()


def snapshot(run: Run) -> dict[str, Any]:
    """Everything a load could change, cloned."""
    sites = {name: {k: v.clone() for k, v in s.tensors().items()} for name, s in run.opt.sites.items()}
    return {
        "model": {k: v.clone() for k, v in run.model.state_dict().items()},
        "opt": _clone(run.opt.base_optimizer.state_dict()),
        "sites": sites,
        "step": run.opt.step_count.clone(),
        "sched": _clone(run.sched.state_dict()),
    }


def _clone(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(v) for v in tree)
    return tree


def assert_inhibiting(run: Run) -> None:
    assert int(run.opt.step_count) >= WARMUP
    assert any(float(s.selected_fraction) > 0 for s in run.opt.sites.values())


def resume_and_compare(case: Case, save: Callable[[Run], Any], load: Callable[[Any, Run], None]) -> Run:
    inputs = data(BEFORE + AFTER)
    straight = build(case, seed=0)
    train(straight, inputs)
    interrupted = build(case, seed=0)
    train(interrupted, inputs[:BEFORE])
    assert_inhibiting(interrupted)
    saved = save(interrupted)
    resumed = build(case, seed=7)  # different initial weights: the load must overwrite them
    load(saved, resumed)
    train(resumed, inputs[BEFORE:])
    assert_identical(snapshot(resumed), snapshot(straight))
    return resumed


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_resume_through_safetensors_is_bit_exact(case: Case, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ckpt.safetensors"

    def save(run: Run) -> pathlib.Path:
        save_checkpoint(path, run.opt, model=run.model, scheduler=run.sched, metadata={"step": BEFORE})
        return path

    def load(saved: pathlib.Path, run: Run) -> None:
        result = load_checkpoint(saved, run.opt, model=run.model, scheduler=run.sched)
        assert result.metadata == {"step": BEFORE}
        assert result.missing_keys == () and result.unexpected_keys == ()

    resumed = resume_and_compare(case, save, load)
    for site in resumed.opt.sites.values():  # a bf16 model's statistics stay fp32, counts int64
        assert site.mean.dtype == site.var.dtype == site.threshold.dtype == torch.float32
        assert site.count.dtype == site.nonfinite.dtype == torch.int64
    with safe_open(str(path), framework="pt") as file:
        name = next(iter(resumed.opt.sites))
        stat = carrier(resumed.model, name, resumed.opt)
        assert file.get_tensor(f"{stat}.var").dtype == torch.float32
        assert file.get_tensor(f"{stat}.count").dtype == torch.int64


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[6]], ids=lambda c: c.name)
def test_resume_through_torch_save_weights_only_is_bit_exact(case: Case) -> None:
    def save(run: Run) -> bytes:
        buffer = io.BytesIO()
        state = {"model": run.model.state_dict(), "opt": run.opt.state_dict(), "sched": run.sched.state_dict()}
        torch.save(state, buffer)
        return buffer.getvalue()

    def load(saved: bytes, run: Run) -> None:
        state = torch.load(io.BytesIO(saved), weights_only=True)
        run.model.load_state_dict(state["model"])
        run.opt.load_state_dict(state["opt"])
        run.sched.load_state_dict(state["sched"])

    resume_and_compare(case, save, load)


# -- bad files -------------------------------------------------------------------------------

def carrier(model: torch.nn.Module, site: str, opt: torch.optim.Optimizer | None = None) -> str:
    """The file key of a site's record: the state entry of the site's weight (its index in the
    optimizer's groups is its id)."""
    weight = model.get_parameter(f"{site}.weight")
    params = [p for group in opt.param_groups for p in group["params"]] if opt else list(model.parameters())
    pid = next(i for i, p in enumerate(params) if p is weight)
    return f"optimizer.state.{pid}.l2e.sites.{site}"


SITE = "gpt_neox.layers.1.mlp.dense_4h_to_h"
STAT = carrier(tiny_gpt_neox(), SITE)  # an AdamW over model.parameters()


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[pathlib.Path, Run]]:
    """A good checkpoint, and a target (trained a little, so its state is not blank) to load into."""
    folder = tmp_path_factory.mktemp("good")
    source = build(CASES[0], seed=0)
    train(source, data(BEFORE))
    path = folder / "good.safetensors"
    save_checkpoint(path, source.opt, model=source.model, scheduler=source.sched)
    target = build(CASES[0], seed=3)
    train(target, data(1))
    yield path, target


def read(path: pathlib.Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as file:
        return {k: file.get_tensor(k) for k in file.keys()}, dict(file.metadata())


def rewrite(edit: Callable[[dict[str, Tensor], dict[str, str]], None]) -> Callable[[pathlib.Path, pathlib.Path], None]:
    """A file edited as a writer would write it: checksums recomputed, so the loader's other
    checks (not the checksum) must catch the edit."""

    def make(good: pathlib.Path, bad: pathlib.Path) -> None:
        tensors, meta = read(good)
        edit(tensors, meta)
        tensors = {key: t.contiguous() for key, t in tensors.items()}
        meta["checksums"] = json.dumps({key: checksum(t) for key, t in tensors.items()})
        save_file(tensors, str(bad), metadata=meta)

    return make


def raw(edit: Callable[[bytes], bytes]) -> Callable[[pathlib.Path, pathlib.Path], None]:
    return lambda good, bad: bad.write_bytes(edit(good.read_bytes()))


def from_model(make_run: Callable[[], Run]) -> Callable[[pathlib.Path, pathlib.Path], None]:
    def make(good: pathlib.Path, bad: pathlib.Path) -> None:
        run = make_run()
        train(run, data(1))
        save_checkpoint(bad, run.opt, model=run.model, scheduler=run.sched)

    return make


def _set(key: str, change: Callable[[Tensor], Tensor]) -> Callable[[dict[str, Tensor], dict[str, str]], None]:
    def edit(tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
        tensors[key] = change(tensors[key].clone())

    return edit


def _poke(index: int, value: float) -> Callable[[Tensor], Tensor]:
    def change(t: Tensor) -> Tensor:
        t.view(-1)[index] = value
        return t

    return change


def _llama_run() -> Run:
    model = tiny_llama(seed=0)
    opt = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), model, config=L2EConfig(warmup_steps=WARMUP))
    return Run(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0))


BAD_FILES: list[tuple[str, Callable[[pathlib.Path, pathlib.Path], None], str]] = [
    ("empty", raw(lambda b: b""), "header: the file is empty"),
    ("truncated", raw(lambda b: b[: len(b) // 2]), "header"),
    ("random-bytes", raw(lambda b: bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())), "header"),
    ("header-too-large", raw(lambda b: (1 << 40).to_bytes(8, "little") + b[8:]), "header: declares"),
    ("bad-json", rewrite(lambda t, m: m.update({"optimizer.state": "{not json"})), "optimizer.state: invalid JSON"),
    ("format-version", rewrite(lambda t, m: m.update({"format_version": "99"})), "format_version: '99'"),
    ("not-ours", rewrite(lambda t, m: m.pop("format")), "header.format"),
    ("missing-key", rewrite(lambda t, m: t.pop(f"{STAT}.var")), f"{STAT}.var: missing"),
    ("unexpected-key", rewrite(lambda t, m: t.update({"model.extra.weight": torch.ones(2)})), "model.extra.weight: unexpected"),
    ("wider-model", from_model(lambda: build(CASES[0], seed=0, hidden=48)), f"{STAT}.mean: shape (192,), expected (128,)"),
    ("wrong-dtype", rewrite(_set(f"{STAT}.count", lambda t: t.float())), f"{STAT}.count: dtype torch.float32"),
    ("model-dtype", rewrite(_set("model.gpt_neox.embed_in.weight", lambda t: t.half())), "model.gpt_neox.embed_in.weight: dtype"),
    ("nan-mean", rewrite(_set(f"{STAT}.mean", _poke(3, float("nan")))), f"{STAT}.mean: contains NaN or inf"),
    ("inf-var", rewrite(_set(f"{STAT}.var", _poke(0, float("inf")))), f"{STAT}.var: contains NaN or inf"),
    ("nan-adam-state", rewrite(_set("optimizer.state.0.exp_avg_sq", _poke(0, float("nan")))), "optimizer.state.0.exp_avg_sq: contains NaN"),
    ("adam-state-shape", rewrite(_set("optimizer.state.0.exp_avg", lambda t: t[:-1])), "optimizer.state.0.exp_avg: shape"),
    ("negative-var", rewrite(_set(f"{STAT}.var", _poke(1, -1.0))), f"{STAT}.var: contains negative"),
    ("negative-count", rewrite(_set(f"{STAT}.count", lambda t: -t)), f"{STAT}.count: contains negative"),
    ("other-model", from_model(_llama_run), "optimizer.l2e.sites: the checkpoint's sites do not match"),
]


@pytest.mark.parametrize("make, expected", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file_raises_and_leaves_state_unchanged(
    good: tuple[pathlib.Path, Run], make: Callable[[pathlib.Path, pathlib.Path], None], expected: str,
    tmp_path: pathlib.Path,
) -> None:
    good_path, target = good
    bad = tmp_path / "bad.safetensors"
    make(good_path, bad)
    before = snapshot(target)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(bad, target.opt, model=target.model, scheduler=target.sched)
    message = str(error.value)
    assert message.startswith(f"{bad}: "), message
    assert expected in message, message
    assert_identical(snapshot(target), before)


def test_the_good_file_loads_into_the_table_target(good: tuple[pathlib.Path, Run]) -> None:
    """The table's errors come from the edits, not from a file the target would refuse anyway."""
    path, target = good
    source = read(path)[0]
    load_checkpoint(path, target.opt, model=target.model, scheduler=target.sched)
    assert torch.equal(target.opt.sites[SITE].var, source[f"{STAT}.var"])


def test_parts_not_passed_are_neither_loaded_nor_unexpected(good: tuple[pathlib.Path, Run]) -> None:
    path, _ = good
    run = build(CASES[0], seed=3)
    before = snapshot(run)
    result = load_checkpoint(path, run.opt)  # the file also holds a model and a scheduler
    assert result.missing_keys == () and result.unexpected_keys == ()
    assert_identical(run.model.state_dict(), before["model"])
    assert_identical(run.sched.state_dict(), before["sched"])
    assert torch.equal(run.opt.sites[SITE].var, read(path)[0][f"{STAT}.var"])


def test_loader_never_unpickles(good: tuple[pathlib.Path, Run], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the loader must not unpickle")

    path, target = good
    saved_weights, _ = read(path)
    for owner, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(owner, name, refuse)
    load_checkpoint(path, target.opt, model=target.model, scheduler=target.sched)
    monkeypatch.undo()
    # The load really happened (the target was trained from another seed for one step).
    assert int(target.opt.step_count) == BEFORE
    name, param = next(iter(target.model.named_parameters()))
    assert torch.equal(param, saved_weights[f"model.{name}"])


def test_crash_mid_save_leaves_the_earlier_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = build(CASES[0], seed=0)
    train(run, data(1))
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, run.opt, model=run.model, metadata={"step": 1})
    earlier = path.read_bytes()

    def crash(tensors: dict[str, Tensor], filename: str, metadata: dict[str, str]) -> None:
        pathlib.Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt  # the process dies mid-write

    train(run, data(1))
    monkeypatch.setattr(checkpoint_io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, run.opt, model=run.model, metadata={"step": 2})
    assert path.read_bytes() == earlier
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no temporary file left behind
    loaded = load_checkpoint(path, run.opt, model=run.model)
    assert loaded.metadata == {"step": 1}
    assert loaded == {"step": 1} and loaded["step"] == 1  # it returns the user metadata itself


# -- strict=False, plain optimizers, the wrapper's own load_state_dict -------------------------


def test_strict_false_loads_matching_sites_and_reports_the_rest(tmp_path: pathlib.Path) -> None:
    every = build(CASES[0], seed=0, layers="all")
    train(every, data(2))
    path = tmp_path / "all.safetensors"
    save_checkpoint(path, every.opt, model=every.model)
    mid = build(CASES[0], seed=0)  # sites of blocks 1 and 2 only
    with pytest.raises(CheckpointError, match=r"optimizer.l2e.sites: .*unexpected \['gpt_neox.layers.0"):
        load_checkpoint(path, mid.opt, model=mid.model)
    with pytest.warns(UserWarning, match="L2EConfig differs"):
        result = load_checkpoint(path, mid.opt, model=mid.model, strict=False)
    assert result.missing_keys == ()
    assert result.unexpected_keys == tuple(
        f"optimizer.l2e.sites.gpt_neox.layers.{i}.mlp.dense_4h_to_h" for i in (0, 3)
    )
    for name, site in mid.opt.sites.items():
        assert_identical(site.tensors(), every.opt.sites[name].tensors())


def test_strict_false_keeps_what_the_file_lacks(tmp_path: pathlib.Path) -> None:
    mid = build(CASES[0], seed=0)
    train(mid, data(2))
    path = tmp_path / "mid.safetensors"
    save_checkpoint(path, mid.opt)  # no model, no scheduler in the file
    every = build(CASES[0], seed=5, layers="all")
    before = snapshot(every)
    with pytest.warns(UserWarning, match="L2EConfig differs"):
        result = load_checkpoint(path, every.opt, model=every.model, scheduler=every.sched, strict=False)
    missing = set(result.missing_keys)
    assert {"model", "scheduler", "optimizer.l2e.sites.gpt_neox.layers.0.mlp.dense_4h_to_h"} <= missing
    assert_identical(every.opt.sites["gpt_neox.layers.0.mlp.dense_4h_to_h"].tensors(), before["sites"]["gpt_neox.layers.0.mlp.dense_4h_to_h"])
    assert_identical(every.opt.sites[SITE].tensors(), mid.opt.sites[SITE].tensors())
    assert_identical(every.model.state_dict(), before["model"])


def test_plain_adamw_state_into_the_wrapper(tmp_path: pathlib.Path) -> None:
    """A state dict without L2E records never restarts the statistics silently: it is refused
    unless the caller asks for the restart (reset_l2e=True, or reset_l2e_state() first)."""
    model = tiny_gpt_neox(seed=0)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for ids in data(2):
        model(ids, labels=ids).loss.backward()
        plain.step()
        plain.zero_grad()
    for how in ("argument", "method"):
        target = build(CASES[0], seed=0)
        train(target, data(1))  # the L2E state is not blank before the load
        before = snapshot(target)
        with pytest.raises(CheckpointError, match="no L2E entries.*reset_l2e=True"):
            target.opt.load_state_dict(plain.state_dict())
        assert_identical(snapshot(target), before)  # refused before anything changed
        if how == "argument":
            target.opt.load_state_dict(plain.state_dict(), reset_l2e=True)
        else:
            target.opt.reset_l2e_state()
            target.opt.load_state_dict(plain.state_dict())
            with pytest.raises(CheckpointError, match="no L2E entries"):  # the request is used up
                target.opt.load_state_dict(plain.state_dict())
        assert_identical(target.opt.base_optimizer.state_dict(), plain.state_dict())
        assert int(target.opt.step_count) == 0
        assert all(int(s.count) == 0 and float(s.var.abs().sum()) == 0 for s in target.opt.sites.values())
    path = tmp_path / "plain.safetensors"
    save_checkpoint(path, plain, model=model)
    with pytest.raises(CheckpointError, match="optimizer.l2e: missing"):
        load_checkpoint(path, target.opt, model=target.model)
    assert load_checkpoint(path, target.opt, model=target.model, strict=False).missing_keys == ("optimizer.l2e",)


def test_wrapper_state_into_a_plain_adamw(tmp_path: pathlib.Path) -> None:
    source = build(CASES[0], seed=0)
    train(source, data(2))
    # A plain AdamW takes the wrapper's state dict: the L2E records ride along as inert extra
    # keys of their carriers' entries, and it steps exactly as with the base part alone.
    runs = []
    for state in (source.opt.state_dict(), source.opt.base_optimizer.state_dict()):
        model = tiny_gpt_neox(seed=0)
        model.load_state_dict(source.model.state_dict())
        plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
        plain.load_state_dict(copy.deepcopy(state))  # torch keeps the very tensors it is given
        for ids in data(2):
            model(ids, labels=ids).loss.backward()
            plain.step()
            plain.zero_grad()
        runs.append(model.state_dict())
    assert_identical(runs[0], runs[1])
    path = tmp_path / "wrapped.safetensors"
    save_checkpoint(path, source.opt)
    with pytest.raises(CheckpointError, match="optimizer.l2e: unexpected"):
        load_checkpoint(path, plain)
    assert load_checkpoint(path, plain, strict=False).unexpected_keys == ("optimizer.l2e",)
    assert "l2e" not in plain.state[next(iter(plain.state))]  # load_checkpoint strips the records


def _drop_last_group_param(state: dict[str, Any]) -> None:
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]


def _shrink_exp_avg(state: dict[str, Any]) -> None:
    state["state"][0]["exp_avg"] = state["state"][0]["exp_avg"][:-1]


def _nan_exp_avg_sq(state: dict[str, Any]) -> None:
    state["state"][0]["exp_avg_sq"] = torch.full_like(state["state"][0]["exp_avg_sq"], float("nan"))


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda s: s["param_groups"].append(dict(s["param_groups"][0])), "param_groups: 2 groups saved"),
        (_drop_last_group_param, "param_groups.0.params"),
        (_shrink_exp_avg, "state.0.exp_avg: shape"),
        (_nan_exp_avg_sq, "state.0.exp_avg_sq: contains NaN"),
    ],
    ids=["group-count", "param-count", "state-shape", "state-nan"],
)
def test_wrapper_load_state_dict_is_atomic(corrupt: Callable[[dict[str, Any]], None], expected: str) -> None:
    """torch's own load checks group sizes only; a bad base part must not half-load either."""
    source = build(CASES[0], seed=0)
    train(source, data(2))
    state = _clone(source.opt.state_dict())
    corrupt(state)
    target = build(CASES[0], seed=3)
    train(target, data(1))
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=expected):
        target.opt.load_state_dict(state)
    assert_identical(snapshot(target), before)


def test_scheduler_of_another_kind_is_rejected(good: tuple[pathlib.Path, Run]) -> None:
    path, _ = good
    run = build(CASES[0], seed=0)
    step_lr = torch.optim.lr_scheduler.StepLR(run.opt, step_size=3)
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="scheduler: keys"):
        load_checkpoint(path, run.opt, model=run.model, scheduler=step_lr)
    assert_identical(snapshot(run), before)


def test_the_documented_resume_example_runs(tmp_path: pathlib.Path) -> None:
    doc = pathlib.Path(__file__).parent.parent / "docs" / "checkpointing.md"
    code = doc.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {"CKPT": tmp_path / "ckpt.safetensors"}
    exec(compile(code, str(doc), "exec"), scope)
    assert int(scope["opt"].step_count) == 10
    assert scope["sched"].last_epoch == 10


def test_sharded_tensors_are_refused_at_save(tmp_path: pathlib.Path) -> None:
    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        pytest.skip("needs torch.distributed and no process group in this process")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = nn.Linear(2, 2)
        model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Replicate()]))
        with pytest.raises(CheckpointError, match="model.weight: a sharded DTensor"):
            save_checkpoint(tmp_path / "x.safetensors", torch.optim.SGD([model.bias]), model=model)
    finally:
        torch.distributed.destroy_process_group()
    assert os.listdir(tmp_path) == []


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.01, total_steps=20),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[3],
    ),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1),
}


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_scheduler_state_round_trips_exactly(kind: str, tmp_path: pathlib.Path) -> None:
    def make() -> tuple[nn.Module, L2EWrapper, Any]:
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        opt = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), model, sites=["1"])
        return model, opt, SCHEDULERS[kind](opt)

    model, opt, sched = make()
    for step in range(5):
        model(torch.randn(3, 4)).square().mean().backward()
        opt.step()
        sched.step(1.0) if kind == "ReduceLROnPlateau" else sched.step()
        opt.zero_grad()
    save_checkpoint(tmp_path / "s.safetensors", opt, model=model, scheduler=sched)
    model2, opt2, sched2 = make()
    load_checkpoint(tmp_path / "s.safetensors", opt2, model=model2, scheduler=sched2)
    assert_identical(sched2.state_dict(), sched.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_save_into_a_missing_folder_names_the_target_and_leaves_nothing(tmp_path: pathlib.Path) -> None:
    run = build(Case("fp32"), seed=0)
    target = tmp_path / "not-there" / "ckpt.safetensors"
    with pytest.raises(CheckpointError, match="not-there.*does not exist") as caught:
        save_checkpoint(target, run.opt, model=run.model)
    assert str(target) in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # no folder made, no temp file left
