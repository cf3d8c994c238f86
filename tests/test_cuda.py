"""GPU-only contracts: the Triton tap on the device, no host sync in a step, and whole-step
CUDA-graph capture, with each tap kernel.

Marked ``cuda``: skipped without a GPU (tests/conftest.py). The capture follows PyTorch's
"whole network capture" recipe: warm up on a side stream, capture forward, backward and
``opt.step()`` with ``AdamW(capturable=True)``, then replay with new data copied into the
static input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from conftest import batches
from l2e_optim import L2EConfig, L2EWrapper
from l2e_optim._lab.zoo import PlainLM
from test_kernels import assert_matches_eager, inputs, padding, run_tap, triton_impl

pytestmark = pytest.mark.cuda

CONFIG = L2EConfig(warmup_steps=2, strength=0.05, ratio=0.05)
WARMUP, REPLAYS = 3, 5


@pytest.fixture
def sync_debug_off() -> Iterator[None]:
    yield
    torch.cuda.set_sync_debug_mode("default")


def cuda_run(model: nn.Module, capturable: bool, kernel: str = "auto") -> tuple[nn.Module, L2EWrapper]:
    model = model.cuda()
    # The embedding is frozen: torch's own CUDA embedding backward reads a segment count on the
    # host, which neither sync-debug mode nor graph capture allows; it is not L2E's to test.
    model.embed.requires_grad_(False)  # type: ignore[union-attr]
    trainable = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.AdamW(trainable, lr=1e-2, capturable=capturable)
    config = dataclasses.replace(CONFIG, kernel=kernel)
    return model, L2EWrapper(base, model, config=config)


def state_of(model: nn.Module, opt: L2EWrapper) -> list[Tensor]:
    l2e = [opt.step_count] + [t for s in opt.sites.values() for t in s.tensors().values()]
    return [p.detach() for p in model.parameters()] + l2e


def eager_step(model: nn.Module, opt: L2EWrapper, ids: Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    model.loss(ids).backward()  # type: ignore[operator]
    opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 2048), (3, 333, 1000)])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_tap_matches_eager_on_device(dtype: torch.dtype, shape: tuple[int, ...], masked: bool) -> None:
    z, grad, mean, var = (t.cuda() for t in inputs(shape, dtype))
    valid = padding(z.numel() // shape[-1]).cuda() if masked else None
    assert_matches_eager("triton", z, grad, valid, mean, var)
    first, second = (run_tap(triton_impl(), z, grad, valid, mean, var) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])  # no atomics


def test_auto_kernel_is_triton_on_cuda() -> None:
    model, opt = cuda_run(PlainLM(), capturable=False)
    assert opt._runtime.kernels.name(torch.ones(2, 8, device="cuda")) == "triton"


@pytest.mark.parametrize("kernel", ["eager", "triton"])
@pytest.mark.parametrize("capturable", [False, True])
def test_step_raises_no_sync_error(corpus: Tensor, sync_debug_off: None, capturable: bool, kernel: str) -> None:
    model, opt = cuda_run(PlainLM(), capturable, kernel)
    data = batches(corpus, 4, 33)
    eager_step(model, opt, next(data).cuda())  # lazy state creation may sync once; not measured
    for _ in range(3):
        ids = next(data).cuda()
        opt.zero_grad(set_to_none=True)
        torch.cuda.set_sync_debug_mode("error")
        model.loss(ids).backward()  # type: ignore[operator]  # the tap's backward runs here
        opt.step()
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(opt.step_count) == 4
    assert all(bool(torch.isfinite(s.var).all()) for s in opt.sites.values())


@pytest.mark.parametrize("kernel", ["eager", "triton"])
def test_whole_step_cuda_graph_replays_like_eager(corpus: Tensor, kernel: str) -> None:
    torch.manual_seed(0)
    graph_model, graph_opt = cuda_run(PlainLM(), capturable=True, kernel=kernel)
    # The reference runs uncaptured with the eager tap (PlainLM seeds its own init).
    eager_model, eager_opt = cuda_run(PlainLM(), capturable=True, kernel="eager")
    data = [b.cuda() for _, b in zip(range(WARMUP + REPLAYS), batches(corpus, 4, 33, seed=5))]
    static_ids = data[0].clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for ids in data[:WARMUP]:
            static_ids.copy_(ids)
            eager_step(graph_model, graph_opt, static_ids)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    graph_opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = graph_model.loss(static_ids)  # type: ignore[operator]
        static_loss.backward()
        graph_opt.step()
    for ids in data[WARMUP:]:
        static_ids.copy_(ids)
        graph.replay()
    torch.cuda.synchronize()

    for ids in data:
        eager_step(eager_model, eager_opt, ids)
    assert int(graph_opt.step_count) == WARMUP + REPLAYS  # capture itself ran nothing
    for a, b in zip(state_of(eager_model, eager_opt), state_of(graph_model, graph_opt)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert all(float(s.selected_fraction) > 0 for s in graph_opt.sites.values())
