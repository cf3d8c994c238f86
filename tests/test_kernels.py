"""The fused tap backward (C and blocked CPU paths, Triton kernel) against the eager tap and the
float64 reference; the dispatcher, the C tap's build, and every value of ``L2EConfig.kernel``.

The Triton kernel runs here on CPU tensors under ``TRITON_INTERPRET=1`` (set by tests/conftest.py
before anything imports triton; no autotuning, small odd shapes).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from conftest import batches
from l2e_optim import ConfigError, L2EConfig, L2EWrapper
from l2e_optim._lab.zoo import PlainLM
from l2e_optim._src import reference
from l2e_optim._src.kernels import FusedTap
from l2e_optim._src.kernels import dispatch, native_tap
from l2e_optim._src.kernels.blocked_tap import BlockedTap
from l2e_optim._src.kernels.native_tap import NativeTap
from l2e_optim._src.tap import _Tap
from l2e_optim._src.tap_site import TapSite

EPS, LOG_EPS, COEF, TAU = 0.01, 1e-6, 0.5, 1.5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def interpret() -> Iterator[None]:
    """The Triton kernel under TRITON_INTERPRET=1 (conftest sets it without a GPU, before any
    import of triton; with a GPU the kernel runs on the device in tests/test_cuda.py instead)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU is present): tests/test_cuda.py runs the kernel")
    pytest.importorskip("triton", reason="the Triton tap needs the triton package (the test/gpu extras)")
    module = importlib.import_module("l2e_optim._src.kernels.triton_tap")
    assert type(module._tap_backward_kernel).__name__ == "InterpretedFunction"
    yield


def triton_impl() -> FusedTap:
    from l2e_optim._src.kernels.triton_tap import triton_tap

    return triton_tap


def make_impl(kind: str) -> FusedTap | None:
    return {"eager": lambda: None, "native": NativeTap, "blocked": BlockedTap, "triton": triton_impl}[kind]()


@pytest.fixture
def kernel_ready(request: pytest.FixtureRequest) -> None:
    """What the test's ``kind`` (or ``kernel``) needs: Triton's interpreter, or a C compiler."""
    params = request.node.callspec.params
    kind = params.get("kind", params.get("kernel"))
    if kind == "triton":
        request.getfixturevalue("interpret")
    elif kind == "native":
        request.getfixturevalue("native")


@pytest.fixture
def native() -> None:
    """The C tap, which needs a C compiler (CI has one; elsewhere these tests skip)."""
    if not native_tap.available():
        pytest.skip("no C compiler: the C tap cannot be built here")


def inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Heavy-tailed activations (so some values pass the threshold), gradient, mean, var."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    z = torch.randn(shape, generator=g) + (torch.rand(shape, generator=g) < 0.05) * 6.0
    grad = torch.randn(shape, generator=g) * 1e-2
    return z.to(dtype), grad.to(dtype), torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) + 0.5


def run_tap(
    fused: FusedTap | None, z: Tensor, grad: Tensor, valid: Tensor | None, mean: Tensor, var: Tensor,
    *, coef: float = COEF, step: int = 5, warmup: int = 0, count: int = 10, loss_scale: Tensor | None = None,
    backend: str | None = None, strided: bool = False,
) -> tuple[Tensor, Tensor]:
    """The outgoing gradient and the step accumulator after one micro-batch through the tap
    (traced by ``torch.compile(backend=backend)`` when given; ``strided``: the tap sees the
    activation in column-major layout, a non-contiguous tensor)."""
    n, device = z.shape[-1], z.device
    site = TapSite.pooled(mean.to(device), var.to(device), *(torch.tensor(v, device=device) for v in (TAU, count, step)))
    acc = site.accumulator
    options = (EPS, LOG_EPS, coef, warmup, "threshold", 0.02, 1)
    leaf = z.detach().clone().requires_grad_()
    def tap(x: Tensor) -> Tensor:
        return _Tap.apply(x, valid, site, options, loss_scale, fused)  # type: ignore[no-untyped-call,no-any-return]

    x = leaf.transpose(0, -1).contiguous().transpose(0, -1) if strided else leaf
    (tap if backend is None else torch.compile(tap, backend=backend, fullgraph=True))(x).backward(grad)
    assert leaf.grad is not None
    return leaf.grad, acc


def padding(tokens: int, seed: int = 1) -> Tensor:
    valid = (torch.rand(tokens, generator=torch.Generator().manual_seed(seed)) > 0.3).float()
    valid[0] = 1.0
    return valid


def assert_matches_eager(kind: str, z: Tensor, grad: Tensor, valid: Tensor | None, mean: Tensor, var: Tensor) -> None:
    want_grad, want_acc = run_tap(None, z, grad, valid, mean, var)
    got_grad, got_acc = run_tap(make_impl(kind), z, grad, valid, mean, var)
    n = z.shape[-1]
    assert got_acc[2 * n + 1] == want_acc[2 * n + 1] > 0  # the selected count: exact
    torch.testing.assert_close(got_acc, want_acc, rtol=1e-5, atol=1e-4)
    if z.dtype == torch.float32:
        # The fused kernels compute what eager computes; Triton differs by fp32 contraction.
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-8)
    else:  # eager rounds the penalty to the gradient's dtype before adding it; the kernels do not
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=2e-2, atol=1e-3)


SHAPES = [(37, 300), (3, 5, 19), (1, 1), (70, 129)]


@pytest.mark.parametrize("kind", ["native", "blocked"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_kernels_match_eager(kernel_ready: None, kind: str, shape: tuple[int, ...], dtype: torch.dtype, masked: bool) -> None:
    z, grad, mean, var = inputs(shape, dtype)
    if shape == (1, 1):
        z = torch.full(shape, 9.0, dtype=dtype)  # one value, selected
    tokens = z.numel() // shape[-1]
    assert_matches_eager(kind, z, grad, padding(tokens) if masked else None, mean, var)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_triton_matches_eager(interpret: None, shape: tuple[int, ...], dtype: torch.dtype, masked: bool) -> None:
    z, grad, mean, var = inputs(shape, dtype)
    if shape == (1, 1):
        z = torch.full(shape, 9.0, dtype=dtype)
    tokens = z.numel() // shape[-1]
    assert_matches_eager("triton", z, grad, padding(tokens) if masked else None, mean, var)


@pytest.mark.parametrize("kind", ["native", "blocked", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_precision_rounds_once(kernel_ready: None, kind: str, dtype: torch.dtype) -> None:
    """At 16 bits the kernels add the penalty in fp32 and round once, eager rounds the penalty
    first: nowhere more than one rounding step farther from the float64 reference than eager."""
    z, grad, mean, var = inputs((37, 300), dtype, seed=4)
    want, *_ = reference.tap_backward(z.float(), grad.float(), None, mean, var, TAU, EPS, LOG_EPS, COEF)
    eager_err = (run_tap(None, z, grad, None, mean, var)[0].double() - want).abs()
    fused_err = (run_tap(make_impl(kind), z, grad, None, mean, var)[0].double() - want).abs()
    ulp = torch.finfo(dtype).eps * want.abs()
    assert bool((fused_err <= eager_err + ulp).all())


def test_blocked_spans_several_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("l2e_optim._src.kernels.blocked_tap.BLOCK_VALUES", 7 * 33)  # 7-row blocks
    z, grad, mean, var = inputs((45, 33), torch.float32)
    assert_matches_eager("blocked", z, grad, padding(45), mean, var)


def test_blocked_buffers_do_not_grow_with_the_token_count() -> None:
    tap = BlockedTap()
    for tokens in (5, 7, 300, 9):  # variable-length batches: one buffer per width and device
        z, grad, mean, var = inputs((tokens, 33), torch.float32)
        run_tap(tap, z, grad, None, mean, var)
    z, grad, mean, var = inputs((4, 17), torch.float32)
    run_tap(tap, z, grad, None, mean, var)
    assert sorted(n for _, n in tap._blocks) == [17, 33]


def test_blocked_output_storage_is_reused_only_when_free() -> None:
    tap = BlockedTap()
    z, grad, mean, var = inputs((40, 33), torch.float32)
    bar, scale = torch.full((33,), 0.5), torch.tensor(1e-2)
    first = tap(z, grad, None, mean, bar, scale, LOG_EPS).grad
    assert first is not None
    kept, pointer = first.clone(), first.data_ptr()
    second = tap(z, grad * 2, None, mean, bar, scale, LOG_EPS).grad  # `first` still held
    assert second is not None and second.data_ptr() != pointer and torch.equal(first, kept)
    pointer = second.data_ptr()
    del first, second
    third = tap(z[:30], grad[:30], None, mean, bar, scale, LOG_EPS).grad  # free again: reused
    assert third is not None and third.data_ptr() == pointer
    torch.testing.assert_close(third, kept[:30])


@pytest.mark.parametrize("kind", ["native", "blocked"])
def test_a_retained_gradient_is_never_overwritten(kernel_ready: None, kind: str) -> None:
    """Both CPU taps reuse their output storage (``BlockedTap._output``); through autograd, a
    leaf gradient still held is never written by a later backward."""
    tap = make_impl(kind)
    z, grad, mean, var = inputs((40, 33), torch.float32)
    leaf_grads = [run_tap(tap, z, grad * k, None, mean, var)[0] for k in (1.0, 3.0)]
    torch.testing.assert_close(leaf_grads[1], run_tap(None, z, grad * 3.0, None, mean, var)[0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(leaf_grads[0], run_tap(None, z, grad, None, mean, var)[0], rtol=1e-6, atol=1e-8)


def test_triton_spans_several_programs(interpret: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("l2e_optim._src.kernels.triton_tap.TARGET_PROGRAMS", 2)  # 2 stripes x 3 rows
    z, grad, mean, var = inputs((70, 200), torch.float32)
    assert_matches_eager("triton", z, grad, padding(70), mean, var)


@pytest.mark.parametrize("kind", ["native", "blocked", "triton"])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_matches_float64_reference(kernel_ready: None, kind: str, masked: bool) -> None:
    z, grad, mean, var = inputs((13, 70), torch.float32, seed=3)
    valid = padding(13) if masked else None
    got_grad, acc = run_tap(make_impl(kind), z, grad, valid, mean, var)
    want_grad, s1, s2, selected = reference.tap_backward(
        z, grad, None if valid is None else valid.tolist(), mean, var, TAU, EPS, LOG_EPS, COEF
    )
    n = z.shape[-1]
    assert int(acc[2 * n + 1]) == selected > 0
    torch.testing.assert_close(acc[:n].double(), torch.tensor(s1, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acc[n : 2 * n].double(), torch.tensor(s2, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    assert float(acc[2 * n]) == (13.0 if valid is None else float(valid.sum()))
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["native", "blocked", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_microbatch_is_skipped(kernel_ready: None, kind: str, bad: float) -> None:
    z, grad, mean, var = inputs((20, 40), torch.float32)
    valid = padding(20)
    z[0, 3] = bad  # a real token
    got_grad, acc = run_tap(make_impl(kind), z, grad, valid, mean, var)
    n = 40
    assert torch.equal(got_grad, grad)  # the micro-batch's penalty is dropped entirely
    assert torch.equal(acc[: 2 * n + 2], torch.zeros(2 * n + 2)) and acc[2 * n + 2] == 1
    want_grad, want_acc = run_tap(None, z, grad, valid, mean, var)  # eager: the same
    assert torch.equal(want_grad, grad) and torch.equal(want_acc, acc)


@pytest.mark.parametrize("kind", ["native", "blocked", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_padding_is_ignored(kernel_ready: None, kind: str, bad: float) -> None:
    z, grad, mean, var = inputs((20, 40), torch.float32)
    valid = padding(20)
    row = int((valid == 0).nonzero()[0])
    clean = run_tap(make_impl(kind), z, grad, valid, mean, var)
    z[row, 3] = bad  # padding's own business: the real tokens still count
    got_grad, acc = run_tap(make_impl(kind), z, grad, valid, mean, var)
    assert torch.equal(got_grad, clean[0]) and torch.equal(acc, clean[1]) and acc[-1] == 0
    want_grad, want_acc = run_tap(None, z, grad, valid, mean, var)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(acc, want_acc, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["native", "blocked", "triton"])
def test_fused_is_deterministic_and_inert_where_it_must_be(kernel_ready: None, kind: str) -> None:
    z, grad, mean, var = inputs((37, 300), torch.float32)
    impl = make_impl(kind)
    first, second = run_tap(impl, z, grad, None, mean, var), run_tap(impl, z, grad, None, mean, var)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for inert in ({"coef": 0.0}, {"step": 1, "warmup": 2}, {"count": 1}):  # no penalty: grad exact
        got, _ = run_tap(impl, z, grad, None, mean, var, **inert)  # type: ignore[arg-type]
        assert torch.equal(got, grad), inert
    scaled, _ = run_tap(impl, z, grad * 1024, None, mean, var, loss_scale=torch.tensor(1024.0))
    torch.testing.assert_close(scaled / 1024, first[0])  # GradScaler's scale is applied


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
@pytest.mark.parametrize("masked", [False, True])
def test_traced_tap_matches_eager(bad: float | None, masked: bool) -> None:
    """Under torch.compile the eager tap is traced in another form (the sums in the forward, in
    two stages; the selection as an fp32 factor, the skip as a where): the same count and token
    rows, the sums and the gradient to fp32 rounding, and a non-finite micro-batch's gradient
    exactly the incoming one, as eager's."""
    torch._dynamo.reset()
    z, grad, mean, var = inputs((20, 40), torch.float32)
    valid = padding(20) if masked else None
    if bad is not None:
        z[0, 3] = bad  # a real token (padding() keeps row 0)
    want_grad, want_acc = run_tap(None, z, grad, valid, mean, var)
    got_grad, got_acc = run_tap(None, z, grad, valid, mean, var, backend="aot_eager")
    torch._dynamo.reset()
    assert torch.equal(got_acc[-3:], want_acc[-3:])  # tokens, selected, non-finite: exact
    torch.testing.assert_close(got_acc, want_acc, rtol=1e-6, atol=1e-6)
    assert got_acc[-2] == (0 if bad is not None else want_acc[-2]) and got_acc[-1] == (bad is not None)
    if bad is None:
        assert want_acc[-2] > 0  # values were selected: the penalty is live
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-8)
    else:
        assert torch.equal(got_grad, grad) and torch.equal(want_grad, grad)


def test_pick_kernel_table() -> None:
    pick = dispatch.pick_kernel
    cpu = {"device_type": "cpu", "compiling": False, "triton_ok": True, "native_ok": True}
    cuda = {"device_type": "cuda", "compiling": False, "triton_ok": True, "native_ok": True}
    assert pick("auto", fusable=True, **cpu) == "native"  # type: ignore[arg-type]
    assert pick("auto", fusable=True, **{**cpu, "native_ok": False}) == "blocked"  # type: ignore[arg-type]
    assert pick("auto", fusable=True, **cuda) == "triton"  # type: ignore[arg-type]
    assert pick("auto", fusable=True, **{**cuda, "triton_ok": False}) == "eager"  # type: ignore[arg-type]
    assert pick("auto", fusable=True, **{**cuda, "device_type": "mps"}) == "eager"  # type: ignore[arg-type]
    assert pick("auto", fusable=False, **cuda) == "eager"  # type: ignore[arg-type]
    assert pick("auto", fusable=False, **cpu) == "eager"  # type: ignore[arg-type]
    assert pick("auto", fusable=True, **{**cuda, "compiling": True}) == "eager"  # type: ignore[arg-type]
    for requested in ("native", "blocked", "triton"):
        assert pick(requested, fusable=True, **cpu) == requested  # type: ignore[arg-type]
        assert pick(requested, fusable=True, **{**cpu, "compiling": True}) == "eager"  # type: ignore[arg-type]
    assert pick("eager", fusable=True, **cuda) == "eager"  # type: ignore[arg-type]


@pytest.mark.parametrize("retrieval", ["threshold", "sample-topk", "batch-topk", "token-topk", "random"])
@pytest.mark.parametrize("inhibition", ["l2e", "memel", "none"])
def test_chooser_runs_eager_where_the_gradient_needs_a_ranking(retrieval: str, inhibition: str) -> None:
    config = L2EConfig(inhibition=inhibition, retrieval=retrieval)  # type: ignore[arg-type]
    chooser = dispatch.KernelChooser(config, torch.device("cpu"))
    z = torch.ones(4, 8)
    ranked = inhibition == "l2e" and retrieval != "threshold"
    cpu_kernel = "native" if native_tap.available() else "blocked"
    assert chooser.name(z) == ("eager" if ranked else cpu_kernel)
    assert chooser.name(z.half()) == ("eager" if ranked else "blocked")  # fp16: not the C loop's
    assert dispatch.KernelChooser(config).name(z) == ("eager" if ranked else "blocked")  # no device: no C tap
    assert (chooser.choose(z) is None) == ranked
    assert chooser.name(torch.ones(0, 8)) == "eager"
    assert dispatch.KernelChooser(L2EConfig(kernel="eager"), torch.device("cpu")).choose(z) is None
    if ranked:
        for kernel in ("native", "blocked", "triton"):
            with pytest.raises(ConfigError, match=f"kernel='{kernel}' fuses pooled statistics and the threshold retrieval only"):
                L2EConfig(inhibition=inhibition, retrieval=retrieval, kernel=kernel)  # type: ignore[arg-type]


def test_per_position_statistics_run_eager(interpret: None, corpus: Tensor) -> None:
    config = L2EConfig(statistics="per-position", max_positions=8)
    assert dispatch.KernelChooser(config, torch.device("cpu")).name(torch.ones(4, 8)) == "eager"
    for kernel in ("native", "blocked", "triton"):
        with pytest.raises(ConfigError, match="statistics='per-position'"):
            L2EConfig(statistics="per-position", kernel=kernel)  # type: ignore[arg-type]


def test_kernel_config_values() -> None:
    for kernel in ("auto", "eager", "native", "blocked", "triton"):
        assert L2EConfig(kernel=kernel).kernel == kernel  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="kernel='cuda' is not one of"):
        L2EConfig(kernel="cuda")  # type: ignore[arg-type]


def test_triton_kernel_is_refused_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    model = PlainLM(layers=2)
    config = L2EConfig(kernel="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors but the model is on cpu"):
        L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model, config=config)
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install 'l2e_optim\[gpu\]'"):
        L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model, config=config)


@pytest.mark.parametrize("kernel", ["native", "blocked"])
def test_cpu_kernels_are_refused_off_the_cpu(kernel: str) -> None:
    model = PlainLM(layers=2).to("meta")
    with pytest.raises(RuntimeError, match=f"kernel='{kernel}'. is a CPU path .* the model is on meta"):
        L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model, config=L2EConfig(kernel=kernel))  # type: ignore[arg-type]
    L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model, config=L2EConfig(kernel="auto"))


def train(kernel: str, corpus: Tensor, inhibition: str = "l2e") -> tuple[list[Tensor], list[Tensor]]:
    model = PlainLM(layers=2)
    config = L2EConfig(kernel=kernel, inhibition=inhibition, warmup_steps=1, strength=0.05, ratio=0.05)  # type: ignore[arg-type]
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.05), model, config=config)
    data = batches(corpus, 3, 17)
    mask = torch.ones(3, 16)  # the loss feeds ids[:, :-1]
    mask[2, 10:] = 0
    for step in range(4):
        opt.set_token_mask(mask if step % 2 else None)
        model.loss(next(data)).backward()  # type: ignore[operator]
        opt.step()
        opt.zero_grad()
    assert all(float(s.selected_fraction) > 0 for s in opt.sites.values())
    return [p.detach() for p in model.parameters()], [t for s in opt.sites.values() for t in s.tensors().values()]


@pytest.mark.parametrize("kernel", ["auto", "native", "blocked", "triton"])
@pytest.mark.parametrize("inhibition", ["l2e", "memel"])
def test_training_with_each_kernel_matches_eager(kernel_ready: None, corpus: Tensor, kernel: str, inhibition: str) -> None:
    want_params, want_state = train("eager", corpus, inhibition)
    got_params, got_state = train(kernel, corpus, inhibition)
    for got, want in zip(got_params + got_state, want_params + want_state):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_importing_the_library_does_not_import_triton() -> None:
    # torch itself imports triton when dynamo loads (an optimizer's first step does), so after a
    # step the check is that the Triton kernel module stayed unloaded on CPU.
    code = (
        "import sys, torch, l2e_optim\n"
        "assert 'triton' not in sys.modules, 'import l2e_optim imported triton'\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))\n"
        "opt = l2e_optim.L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model, sites=['2'])\n"
        "model(torch.randn(3, 4)).sum().backward(); opt.step()\n"
        "assert 'l2e_optim._src.kernels.triton_tap' not in sys.modules, 'the Triton tap was loaded'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from l2e_optim._src.kernels import triton_tap as tt
target = GPUTarget("cuda", 90, 32)
for dtype, masked, write in (("bf16", True, True), ("fp32", False, False)):
    signature = {"z_ptr": "*" + dtype, "grad_ptr": "*" + dtype, "out_ptr": "*" + dtype, "valid_ptr": "*fp32",
                 "mean_ptr": "*fp32", "bar_ptr": "*fp32", "scale_ptr": "*fp32", "part_ptr": "*fp32",
                 "tokens": "i32", "neurons": "i32", "rows_per_program": "i32", "log_eps": "fp32",
                 "HAS_VALID": "constexpr", "WRITE_GRAD": "constexpr", "BLOCK_T": "constexpr", "BLOCK_N": "constexpr"}
    constants = {"HAS_VALID": masked, "WRITE_GRAD": write, "BLOCK_T": tt.BLOCK_T, "BLOCK_N": tt.BLOCK_N}
    assert "cubin" in triton.compile(ASTSource(tt._tap_backward_kernel, signature, constants), target=target).asm
signature = {"grad_ptr": "*bf16", "out_ptr": "*bf16", "finite_ptr": "*i32", "numel": "i32", "BLOCK": "constexpr"}
kernel = ASTSource(tt._restore_if_nonfinite_kernel, signature, {"BLOCK": tt.COPY_BLOCK})
assert "cubin" in triton.compile(kernel, target=target).asm
"""


def test_triton_kernels_compile_for_a_gpu() -> None:
    # The interpreter runs any Python; the real compiler is stricter (it refused the kernels while
    # their parameters were annotated ``Any``). Compiling to an H100 (sm_90) cubin needs no GPU.
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.getcwd()
    subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], check=True, env=env, timeout=600)


def test_native_sums_do_not_depend_on_the_thread_count(native: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each thread owns a stripe of neurons and adds its rows in order: bit-identical results."""
    z, grad, mean, var = inputs((50, 200), torch.float32, seed=5)
    monkeypatch.setattr(native_tap, "MIN_VALUES_PER_THREAD", 1)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3, 7):
            torch.set_num_threads(count)
            results.append(run_tap(NativeTap(), z, grad, padding(50), mean, var))
    finally:
        torch.set_num_threads(threads)
    assert results[0][1][-2] > 0  # values were selected
    for got, acc in results[1:]:
        assert torch.equal(got, results[0][0]) and torch.equal(acc, results[0][1])


def test_native_takes_strided_inputs(native: None) -> None:
    """A column-major activation and an expanded incoming gradient (as ``.sum().backward()``
    gives): the same as eager."""
    z, grad, mean, var = inputs((30, 64), torch.float32)
    flat = torch.tensor(1e-2).expand(30, 64)
    got_grad, got_acc = run_tap(NativeTap(), z, flat, None, mean, var, strided=True)
    want_grad, want_acc = run_tap(None, z, flat, None, mean, var)
    assert got_acc[-2] == want_acc[-2] > 0
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got_acc, want_acc, rtol=1e-5, atol=1e-4)


@pytest.fixture
def fresh_native(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The C tap's build state reset, with its cache in a fresh folder; restored afterwards."""
    monkeypatch.setenv("L2E_OPTIM_CACHE_DIR", str(tmp_path / "cache"))
    native_tap.library.cache_clear()
    native_tap.available.cache_clear()
    yield tmp_path / "cache"
    native_tap.library.cache_clear()
    native_tap.available.cache_clear()


def test_native_is_built_once_and_then_loaded_from_the_cache(
    native: None, fresh_native: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[Path] = []
    build = native_tap._build

    def counted(cc: str, folder: Path, path: Path) -> None:
        builds.append(path)
        build(cc, folder, path)

    monkeypatch.setattr(native_tap, "_build", counted)
    native_tap.library()
    assert len(builds) == 1 and builds[0].parent == fresh_native and builds[0].exists()
    assert [p.name for p in fresh_native.iterdir()] == [builds[0].name]  # no scratch file left
    native_tap.library.cache_clear()
    native_tap.library()  # a new process, in effect: loaded, not rebuilt
    assert len(builds) == 1


def test_native_builds_where_the_cache_cannot_be_written(native: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("L2E_OPTIM_CACHE_DIR", str(tmp_path / "a-file" / "cache"))  # mkdir fails
    native_tap.library.cache_clear()
    try:
        assert native_tap.library()._name.startswith(tempfile.gettempdir())
    finally:
        native_tap.library.cache_clear()


def test_native_builds_race_safely(native: None, tmp_path: Path) -> None:
    """Ranks starting together build into one cache: each gets a whole, loadable library."""
    code = (  # each process runs the library it got: 4 tokens x 8 neurons, every value selected
        "import torch; from l2e_optim._src.kernels.native_tap import NativeTap; "
        "from l2e_optim._src.tap_site import TapSite; "
        "site = TapSite.pooled(torch.zeros(8), torch.ones(8), torch.tensor(0.5), torch.tensor(10), torch.tensor(5)); "
        "NativeTap().site_backward(torch.ones(4, 8), torch.ones(4, 8), None, site, (0.01, 1e-6, 1e-3, 0), None); "
        "acc = site.accumulator; assert acc[16:].tolist() == [4.0, 32.0, 0.0], acc"
    )
    env = {**os.environ, "L2E_OPTIM_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".so"]) == 1


def test_without_a_compiler_auto_falls_back_and_native_is_refused(
    fresh_native: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", str(fresh_native / "no-such-cc"))
    assert not native_tap.available()
    assert dispatch.KernelChooser(L2EConfig(), torch.device("cpu")).name(torch.ones(4, 8)) == "blocked"
    model = PlainLM(layers=2)
    with pytest.raises(RuntimeError, match=r"kernel='native'. needs the C tap, which cannot be built here: .*no-such-cc"):
        L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model, config=L2EConfig(kernel="native"))
    monkeypatch.setattr(native_tap, "compiler", lambda: None)
    native_tap.library.cache_clear()
    with pytest.raises(native_tap.NativeUnavailable, match="no C compiler found"):
        native_tap.library()


def test_native_compile_error_is_reported(fresh_native: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native_tap, "SOURCE", broken)
    if native_tap.compiler() is None:
        pytest.skip("no C compiler")
    with pytest.raises(native_tap.NativeUnavailable, match="failed"):
        native_tap.library()
    assert not fresh_native.exists() or not any(fresh_native.iterdir())  # nothing half-written kept


def test_native_builds_with_a_compiler_command_in_cc(
    native: None, fresh_native: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``$CC`` may be a command line (``ccache gcc``); here a launcher in front of the compiler."""
    compiler = native_tap.compiler()
    assert compiler is not None
    monkeypatch.setenv("CC", f"env {compiler}")
    native_tap.library()
    assert [p.suffix for p in fresh_native.iterdir()] == [".so"]


def test_auto_runs_the_c_tap_on_cpu_when_it_builds(corpus: Tensor) -> None:
    """The default path end to end: a CPU wrapper with kernel='auto' really calls the C tap."""
    model = PlainLM(layers=2)
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.05), model, config=L2EConfig(warmup_steps=0))
    model.loss(next(batches(corpus, 2, 17))).backward()  # type: ignore[operator]
    opt.step()
    chosen = opt._runtime.kernels
    if native_tap.available():
        assert chosen._native is not None and chosen._blocked is None
    else:
        assert chosen._native is None and chosen._blocked is not None
    assert all(int(s.count) == 2 * 16 for s in opt.sites.values())
