"""L2E under torch.distributed: DDP and FSDP2 with 2 real gloo processes on CPU.

Each spawned job runs several checks (process start-up is the cost). Workers write what they
saw with ``torch.save``; the parent compares the ranks with each other and with a single-process
run on the concatenated global batch. Rank ``r`` trains on rows ``[r*B/2, (r+1)*B/2)`` of every
global batch, so the two ranks always see different data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import pathlib
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import batches
from l2e_optim import L2EConfig, L2EWrapper, load_checkpoint, save_checkpoint
from l2e_optim._lab.zoo import PlainLM, stdlib_bytes, tiny_gpt2, tiny_gpt_neox

pytestmark = pytest.mark.distributed

WORLD = 2
GLOBAL_BATCH, SEQ = 4, 17
DDP_STEPS, FSDP_STEPS, RESUME_STEPS, ACCUM_STEPS = 10, 5, 3, 4
# warmup 2 and a visible strength: the L2E gradient is live for most of the steps compared.
CONFIG = L2EConfig(strength=0.05, warmup_steps=2, ratio=0.05)
ACCUM_CONFIG = dataclasses.replace(CONFIG, grad_accumulation_steps=2)
PER_POSITION_CONFIG = dataclasses.replace(CONFIG, statistics="per-position", max_positions=8)
PER_POSITION_STEPS = 4
REPO = pathlib.Path(__file__).resolve().parents[1]


# -- models, data, loops (shared by the workers and the single-process reference) --------------
def odd_lm(seed: int = 0) -> PlainLM:
    """Embedding and head of 251 rows, MLP hidden 37: row counts that split unevenly over 2 ranks."""
    return PlainLM(layers=4, width=16, vocab=251, seed=seed, hidden=37)


def odd_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    ids = ids % 251
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def hf_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    loss: torch.Tensor = model(input_ids=ids, labels=ids).loss
    return loss


def global_batches(steps: int, skip: int = 0) -> list[torch.Tensor]:
    """The same global batches in every process (deterministic in the seed)."""
    stream: Iterator[torch.Tensor] = batches(stdlib_bytes(60_000), GLOBAL_BATCH, SEQ, seed=7)
    out = [next(stream) for _ in range(skip + steps)]
    return out[skip:]


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    data: list[torch.Tensor],
    rank: int = 0,
    world: int = 1,
) -> None:
    for ids in data:
        local = ids.chunk(world)[rank]
        opt.zero_grad()
        loss_fn(model, local).backward()
        opt.step()


def train_accumulating(
    model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor], rank: int = 0, world: int = 1
) -> None:
    """Each global batch as 2 micro-batches (its first and last rows of every rank's share)."""
    for ids in data:
        local = ids.chunk(world)[rank]
        opt.zero_grad()
        for index, micro in enumerate(local.chunk(2)):
            last = index == 1 or world == 1
            sync = contextlib.nullcontext() if last else model.no_sync()  # type: ignore[operator]
            with sync:
                (odd_loss(model, micro) / 2).backward()
        opt.step()


def make_opt(model: nn.Module, config: L2EConfig = CONFIG, **kwargs: Any) -> L2EWrapper:
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return L2EWrapper(base, model, config=config, **kwargs)


def l2e_state(opt: L2EWrapper, strip: str = "") -> dict[str, dict[str, torch.Tensor]]:
    return {
        name.removeprefix(strip): {k: v.detach().clone() for k, v in site.tensors().items()}
        for name, site in opt.sites.items()
    }


class AllReduceCounter:
    """Patches ``torch.distributed.all_reduce`` (what the wrapper calls) to record each call."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self._original = dist.all_reduce

    def __enter__(self) -> AllReduceCounter:
        def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.sizes.append(tensor.numel())
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counting  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self._original


def accumulator_numel(opt: L2EWrapper) -> int:
    return sum(site.accumulator.numel() for site in opt.sites.values())


# -- spawning -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


Job = Callable[[int, pathlib.Path], Any]


def launch(job: str | Job, out: pathlib.Path, world: int = WORLD) -> list[Any]:
    """Run ``job`` (a name in ``JOBS``, or a module-level function) on ``world`` gloo ranks;
    return what each rank returned."""
    name = job if isinstance(job, str) else job.__name__
    for attempt in range(2):
        try:
            mp.start_processes(_entry, args=(job, world, free_port(), str(out)), nprocs=world, start_method="spawn")
            break
        except mp.ProcessRaisedException as error:
            # The free port can be taken by another process between our probe and the bind.
            if attempt == 1 or "address already in use" not in str(error).lower():
                raise
    return [torch.load(out / f"{name}_rank{r}.pt", weights_only=True) for r in range(world)]


def _entry(rank: int, job: str | Job, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run = JOBS[job] if isinstance(job, str) else job
        result = run(rank, pathlib.Path(out))
        name = job if isinstance(job, str) else job.__name__
        torch.save(result, pathlib.Path(out) / f"{name}_rank{rank}.pt")
        # Every rank done before any tears gloo down (a rank exiting while its peer still works
        # can abort at exit: seen in benchmarks/distributed_collective.py).
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    finally:
        dist.destroy_process_group()


# -- jobs (run on every rank) ---------------------------------------------------------------
def ddp_job(rank: int, out: pathlib.Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    result: dict[str, Any] = {}
    data = global_batches(DDP_STEPS)
    for broadcast in (False, True):
        with warnings.catch_warnings():
            # torch 2.13 deprecates the name in favour of forward_sync_buffers; same behaviour.
            warnings.simplefilter("ignore", FutureWarning)
            model = DDP(tiny_gpt_neox(layers=4), broadcast_buffers=broadcast)
        opt = make_opt(model)  # built on the DDP wrapper, as a user would
        with AllReduceCounter() as counter:
            train(model, opt, hf_loss, data, rank, WORLD)
        buffers = {t.data_ptr() for t in model.buffers()}
        tag = f"broadcast_{broadcast}"
        result[tag] = {
            "l2e": l2e_state(opt, strip="module."),
            "step": opt.step_count.clone(),
            "params": {n: p.detach().clone() for n, p in model.module.named_parameters()},
            "allreduce_sizes": torch.tensor(counter.sizes, dtype=torch.int64),
            "accumulator_numel": accumulator_numel(opt),
            "l2e_in_buffers": any(
                t.data_ptr() in buffers for s in opt.sites.values() for t in s.tensors().values()
            ),
        }
    # Gradient accumulation under no_sync: micro-batches pile up locally, one reduce at step().
    model = DDP(odd_lm())
    opt = make_opt(model, ACCUM_CONFIG)
    with AllReduceCounter() as counter:
        train_accumulating(model, opt, data[:ACCUM_STEPS], rank, WORLD)
    result["accumulation"] = {
        "l2e": l2e_state(opt, strip="module."),
        "params": {n: p.detach().clone() for n, p in model.module.named_parameters()},
        "allreduce_calls": len(counter.sizes),
    }
    # Per-position statistics (and the tail row: SEQ - 1 = 16 positions, 8 rows of their own)
    # still go through the one all-reduce of the step.
    model = DDP(odd_lm())
    opt = make_opt(model, PER_POSITION_CONFIG)
    with AllReduceCounter() as counter:
        train(model, opt, odd_loss, data[:PER_POSITION_STEPS], rank, WORLD)
    result["per_position"] = {
        "l2e": l2e_state(opt, strip="module."),
        "allreduce_sizes": torch.tensor(counter.sizes, dtype=torch.int64),
        "accumulator_numel": accumulator_numel(opt),
    }
    # process_group= selects the group: singleton groups leave each rank's statistics local.
    singles, _ = dist.new_subgroups(1)
    model = odd_lm()
    opt = make_opt(model, process_group=singles)
    with AllReduceCounter() as counter:
        train(model, opt, odd_loss, data[:2], rank, WORLD)
    result["singleton_group"] = {"l2e": l2e_state(opt), "allreduce_calls": len(counter.sizes)}
    return result


def fsdp_model(seed: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = odd_lm(seed=seed)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }


def gpt2_after_fully_shard(rank: int) -> dict[str, Any]:
    """HF GPT-2 (Conv1D sites, weights stored [in, out]) sharded first, then wrapped."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = tiny_gpt2(layers=2)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_opt(model)
    train(model, opt, hf_loss, global_batches(2), rank, WORLD)
    return {name: {"neurons": site.neurons, "count": site.count.clone()} for name, site in opt.sites.items()}


def fsdp_job(rank: int, out: pathlib.Path) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    model = fsdp_model(seed=0)
    opt = make_opt(model)  # built after fully_shard: DTensor parameters and optimizer state
    with AllReduceCounter() as counter:
        train(model, opt, odd_loss, global_batches(FSDP_STEPS), rank, WORLD)
    result: dict[str, Any] = {
        "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
        "local_rows": {n: p.to_local().shape[0] for n, p in model.named_parameters()},  # type: ignore[attr-defined]
        "l2e": l2e_state(opt),
        "params": full_params(model),
        "allreduce_sizes": torch.tensor(counter.sizes, dtype=torch.int64),
        "accumulator_numel": accumulator_numel(opt),
    }
    result["gpt2"] = gpt2_after_fully_shard(rank)
    save_full_checkpoint(out / "fsdp.safetensors", model, opt)
    train(model, opt, odd_loss, global_batches(RESUME_STEPS, skip=FSDP_STEPS), rank, WORLD)
    result["continued"] = {"l2e": l2e_state(opt), "params": full_params(model)}
    return result


def resume_job(rank: int, out: pathlib.Path) -> dict[str, Any]:
    model = fsdp_model(seed=1)  # another init: only the checkpoint can make it match
    opt = make_opt(model)
    load_full_checkpoint(out / "fsdp.safetensors", model, opt)
    step = opt.step_count.clone()
    train(model, opt, odd_loss, global_batches(RESUME_STEPS, skip=FSDP_STEPS), rank, WORLD)
    return {"step": step, "l2e": l2e_state(opt), "params": full_params(model)}


# The rank-0 gather path for small FSDP2 jobs (docs/distributed.md): full state dicts on rank 0
# into a plain replica, which save_checkpoint / load_checkpoint handle as any single-process model.
# The wrapper goes to get/set_optimizer_state_dict itself: its L2E records ride in the state.
def plain_replica() -> tuple[nn.Module, L2EWrapper]:
    model = odd_lm()
    return model, make_opt(model)


def save_full_checkpoint(path: pathlib.Path, model: nn.Module, opt: L2EWrapper) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors on rank 0
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, opt, options=options)
    if dist.get_rank() == 0:
        plain, plain_opt = plain_replica()
        plain.load_state_dict(model_sd)
        # Not set_optimizer_state_dict: on a fresh optimizer it steps it, and a wrapper's step
        # is a collective that rank 0 would enter alone. The FQN-keyed groups list the
        # parameters in the replica's order, which is all load_state_dict needs.
        plain_opt.load_state_dict(optim_sd)
        save_checkpoint(path, plain_opt, model=plain)
    dist.barrier()


def load_full_checkpoint(path: pathlib.Path, model: nn.Module, opt: L2EWrapper) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    plain, plain_opt = plain_replica()
    load_checkpoint(path, plain_opt, model=plain)  # validates the whole file first
    options = StateDictOptions(full_state_dict=True)  # every rank keeps only its shard
    set_model_state_dict(model, plain.state_dict(), options=options)
    full_optim = get_optimizer_state_dict(plain, plain_opt, options=options)
    set_optimizer_state_dict(model, opt, full_optim, options=options)


JOBS: dict[str, Callable[[int, pathlib.Path], dict[str, Any]]] = {
    "ddp": ddp_job,
    "fsdp": fsdp_job,
    "resume": resume_job,
}


# -- comparisons ----------------------------------------------------------------------------
def assert_l2e_equal(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    """Bit-identical L2E state (ranks of one job reduce the very same sums)."""
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key} differs between ranks"


def assert_l2e_close(got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]) -> None:
    """Equal up to summation order: counts exactly, floats to fp32 rounding."""
    assert got.keys() == want.keys()
    for name in want:
        for key, value in want[name].items():
            if value.dtype == torch.int64:
                assert torch.equal(got[name][key], value), f"{name}.{key}"
            else:
                torch.testing.assert_close(got[name][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}.{key}: {m}")


def assert_params_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def single_process(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    steps: int,
    config: L2EConfig = CONFIG,
) -> tuple[L2EWrapper, int]:
    """The reference: one process, the concatenated global batch; counts all_reduce calls."""
    opt = make_opt(model, config)
    with AllReduceCounter() as counter:
        train(model, opt, loss_fn, global_batches(steps))
    return opt, len(counter.sizes)


# -- tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch("ddp", tmp_path_factory.mktemp("ddp"))


def test_ddp_matches_single_process_on_global_batch(ddp_ranks: list[dict[str, Any]]) -> None:
    ranks = ddp_ranks
    reference = tiny_gpt_neox(layers=4)
    opt, calls = single_process(reference, hf_loss, DDP_STEPS)
    assert calls == 0  # no process group: nothing extra
    want_l2e = l2e_state(opt)
    want_params = {n: p.detach() for n, p in reference.named_parameters()}
    assert all(float(s.selected_fraction) > 0 for s in opt.sites.values())  # L2E really selected
    # The L2E gradient moves the parameters far beyond the tolerance used below, so a rank-local
    # or mis-scaled L2E gradient could not pass.
    control = tiny_gpt_neox(layers=4)
    single_process(control, hf_loss, DDP_STEPS, dataclasses.replace(CONFIG, strength=0.0))
    moved = max((p - want_params[n]).abs().max().item() for n, p in control.named_parameters())
    assert moved > 1e-3
    for tag in ("broadcast_False", "broadcast_True"):
        r0, r1 = ranks[0][tag], ranks[1][tag]
        assert_l2e_equal(r0["l2e"], r1["l2e"])
        for name in r0["params"]:
            assert torch.equal(r0["params"][name], r1["params"][name]), name
        assert_l2e_close(r0["l2e"], want_l2e)
        assert_params_close(r0["params"], want_params)
        assert int(r0["step"]) == DDP_STEPS
        # Exactly one all_reduce per step, carrying every site's accumulator at once.
        assert r0["allreduce_sizes"].tolist() == [r0["accumulator_numel"]] * DDP_STEPS
        assert not r0["l2e_in_buffers"]
    # broadcast_buffers=True changes nothing.
    assert_l2e_equal(ranks[0]["broadcast_True"]["l2e"], ranks[0]["broadcast_False"]["l2e"])
    for name, value in ranks[0]["broadcast_True"]["params"].items():
        assert torch.equal(value, ranks[0]["broadcast_False"]["params"][name]), name


def test_ddp_gradient_accumulation_under_no_sync(ddp_ranks: list[dict[str, Any]]) -> None:
    """Rank r's micro-batch k holds rows of the global micro-batch k; one reduce per step."""
    reference = odd_lm()
    opt = make_opt(reference, ACCUM_CONFIG)
    global_micro = [
        torch.cat([rows.chunk(2)[k] for rows in ids.chunk(WORLD)])
        for ids in global_batches(ACCUM_STEPS)
        for k in (0, 1)
    ]
    for first, second in zip(global_micro[::2], global_micro[1::2]):
        opt.zero_grad()
        for micro in (first, second):
            (odd_loss(reference, micro) / 2).backward()
        opt.step()
    r0, r1 = (rank["accumulation"] for rank in ddp_ranks)
    assert r0["allreduce_calls"] == ACCUM_STEPS
    assert_l2e_equal(r0["l2e"], r1["l2e"])
    assert_l2e_close(r0["l2e"], l2e_state(opt))
    assert_params_close(r0["params"], {n: p.detach() for n, p in reference.named_parameters()})


def test_ddp_per_position_statistics_match_single_process(ddp_ranks: list[dict[str, Any]]) -> None:
    reference = odd_lm()
    opt, _ = single_process(reference, odd_loss, PER_POSITION_STEPS, PER_POSITION_CONFIG)
    r0, r1 = (rank["per_position"] for rank in ddp_ranks)
    assert_l2e_equal(r0["l2e"], r1["l2e"])
    assert_l2e_close(r0["l2e"], l2e_state(opt))
    assert r0["allreduce_sizes"].tolist() == [r0["accumulator_numel"]] * PER_POSITION_STEPS
    assert all(site.rows == 9 and int(site.count[-1]) > 0 for site in opt.sites.values())


def test_process_group_option_selects_the_group(ddp_ranks: list[dict[str, Any]]) -> None:
    local = [r["singleton_group"] for r in ddp_ranks]
    assert local[0]["allreduce_calls"] == 0 and local[1]["allreduce_calls"] == 0
    name = next(iter(local[0]["l2e"]))
    assert not torch.equal(local[0]["l2e"][name]["mean"], local[1]["l2e"][name]["mean"])


@pytest.fixture(scope="module")
def fsdp_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def fsdp_ranks(fsdp_dir: pathlib.Path) -> list[dict[str, Any]]:
    return launch("fsdp", fsdp_dir)


def test_fsdp2_matches_single_process(fsdp_ranks: list[dict[str, Any]]) -> None:
    ranks = fsdp_ranks
    reference = odd_lm(seed=0)
    opt, _ = single_process(reference, odd_loss, FSDP_STEPS)
    r0, r1 = ranks
    assert r0["sharded"] and r1["sharded"]
    # The 37-row up projections and 251-row embedding/head split unevenly (19 + 18, 126 + 125).
    assert r0["local_rows"]["blocks.1.mlp.0.weight"] == 19 and r1["local_rows"]["blocks.1.mlp.0.weight"] == 18
    assert r0["local_rows"]["head.weight"] + r1["local_rows"]["head.weight"] == 251
    assert_l2e_equal(r0["l2e"], r1["l2e"])
    assert_l2e_close(r0["l2e"], l2e_state(opt))
    assert_params_close(r0["params"], {n: p.detach() for n, p in reference.named_parameters()})
    assert r0["allreduce_sizes"].tolist() == [r0["accumulator_numel"]] * FSDP_STEPS


def test_wrapper_built_after_fully_shard_reads_global_widths(fsdp_ranks: list[dict[str, Any]]) -> None:
    plain = tiny_gpt2(layers=2)
    want = {name: site.neurons for name, site in make_opt(plain).sites.items()}
    for rank in fsdp_ranks:
        got = rank["gpt2"]
        assert {name: site["neurons"] for name, site in got.items()} == want  # 128, not a shard's 64
        # Both ranks' tokens of both steps are counted (the hooks ran on the sharded model).
        assert all(int(site["count"]) == 2 * GLOBAL_BATCH * SEQ for site in got.values())


def test_fsdp2_checkpoint_resumes_identically(fsdp_dir: pathlib.Path, fsdp_ranks: list[dict[str, Any]]) -> None:
    resumed = launch("resume", fsdp_dir)  # a fresh 2-rank job, another model init
    want = fsdp_ranks[0]["continued"]
    for rank in resumed:
        assert int(rank["step"]) == FSDP_STEPS
        assert_l2e_equal(rank["l2e"], want["l2e"])
        for name, value in want["params"].items():
            assert torch.equal(rank["params"][name], value), name
    # The file is an ordinary single-process checkpoint: a plain model and optimizer load it.
    plain, plain_opt = plain_replica()
    load_checkpoint(fsdp_dir / "fsdp.safetensors", plain_opt, model=plain)
    assert int(plain_opt.step_count) == FSDP_STEPS


def test_collective_benchmark_smoke() -> None:
    """The benchmark runs under torchrun (2 ranks) and posts its own checks and sane numbers."""
    sys.path.insert(0, str(REPO))
    from benchmarks import _common

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "benchmarks.distributed_collective", "--smoke"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = _common.parse(done.stdout)
    assert result["smoke"] is True and result["world_size"] == WORLD
    assert all(result["checks"].values()), result["checks"]
    model = PlainLM(width=32, layers=4)  # the smoke model: its accumulators, fp32
    opt = L2EWrapper(torch.optim.AdamW(model.parameters()), model, config=L2EConfig(layers="all"))
    assert result["collective_bytes_per_step"] == accumulator_numel(opt) * 4
    assert result["collective_calls_per_step"] == 1.0
    for key in ("collective_exposed_s", "collective_blocking_s", "step_s_l2e", "step_s_adamw"):
        assert 0.0 < result[key] < 60.0, key
    assert 0.0 < result["collective_blocking_share"] == pytest.approx(
        result["collective_blocking_s"] / result["step_s_l2e"]
    )
    assert "-----" in done.stdout  # the table for people came first
