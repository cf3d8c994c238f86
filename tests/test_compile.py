"""torch.compile(model) with the L2E hooks attached: no graph breaks, eager results, no recompiles.

The default tests compile with the ``aot_eager`` backend: Dynamo traces the hooks and the tap's
autograd function and AOTAutograd traces its backward exactly as with Inductor, without the C++
build that makes Inductor take ~50 s on a 2-core CI machine; the Inductor run is marked slow.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import batches
from l2e_optim import L2EConfig, L2EWrapper
from l2e_optim._lab.zoo import PlainLM, tiny_gpt_neox
from l2e_optim._src import tap as tap_module
from l2e_optim._src.tap_site import TapSite

CONFIG = {"warmup_steps": 1, "strength": 0.05, "ratio": 0.05}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(before)


def wrap(model: nn.Module, **overrides: Any) -> L2EWrapper:
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return L2EWrapper(base, model, config=L2EConfig(**{**CONFIG, **overrides}))


def loss_of(model: nn.Module, ids: Tensor) -> Tensor:
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def site_state(opt: L2EWrapper) -> list[Tensor]:
    return [opt.step_count] + [t for s in opt.sites.values() for t in s.tensors().values()]


@pytest.mark.parametrize("inhibition", ["l2e", "memel", "l2e+grad_scaler", "memel+per-position"])
def test_explain_finds_no_graph_break(corpus: Tensor, inhibition: str) -> None:
    model = PlainLM()
    statistics = "per-position" if inhibition.endswith("per-position") else "pooled"
    opt = wrap(model, inhibition=inhibition.split("+")[0], statistics=statistics, max_positions=8)
    if inhibition.endswith("grad_scaler"):  # the hook then reads the scaler's scale tensor
        opt.set_grad_scaler(torch.amp.GradScaler("cpu", init_scale=2.0**10))
    ids = next(batches(corpus, 4, 17))
    loss_of(model, ids).backward()
    opt.step()  # statistics exist, so every branch of the hooks is live
    explained = torch._dynamo.explain(model)(ids[:, :-1])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_hf_model_breaks_no_more_with_hooks(corpus: Tensor) -> None:
    ids = next(batches(corpus, 2, 16))
    counts = []
    for hooked in (False, True):
        torch._dynamo.reset()
        model = tiny_gpt_neox(layers=2)
        if hooked:
            wrap(model)
        explained = torch._dynamo.explain(model)(input_ids=ids)
        counts.append(explained.graph_break_count)
        reasons = " ".join(str(r) for r in explained.break_reasons)
        assert "l2e_optim" not in reasons, reasons
    assert counts[1] == counts[0]


def compiled_matches_eager(
    corpus: Tensor, backend: str, steps: int = 4, grad_atol: float = 1e-6, **overrides: Any
) -> CompileCounterWithBackend:
    eager_model, compiled_model = PlainLM(), PlainLM()
    eager, opt = wrap(eager_model, **overrides), wrap(compiled_model, **overrides)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(compiled_model, backend=counter)
    frames = []
    for step, ids in enumerate(batches(corpus, 4, 17, seed=3)):
        if step == steps:
            break
        torch.manual_seed(step)  # the random retrieval draws in the backward
        loss_of(eager_model, ids).backward()
        torch.manual_seed(step)
        loss_of(compiled, ids).backward()
        for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=grad_atol)
        for o in (eager, opt):
            o.step()
            o.zero_grad()
        for a, b in zip(site_state(eager), site_state(opt)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        frames.append(counter.frame_count)
    assert all(float(s.selected_fraction) > 0 for s in opt.sites.values()), "inhibition never ran"
    assert frames[0] >= 1 and frames[-1] == frames[1], f"recompiled after step 2: {frames}"
    return counter


def test_compiled_model_equals_eager_without_recompiles(corpus: Tensor) -> None:
    compiled_matches_eager(corpus, "aot_eager")


@pytest.mark.parametrize(
    "overrides",
    [{"retrieval": r} for r in ("batch-topk", "sample-topk", "token-topk", "random")]
    + [{"statistics": "per-position", "max_positions": 8}],
    ids=["batch-topk", "sample-topk", "token-topk", "random", "per-position"],
)
def test_every_traced_tap_gathers_what_eager_gathers(corpus: Tensor, overrides: dict[str, Any]) -> None:
    # Dynamo inlines the tap's backward, accumulator mutation included; if it ever gave up on
    # it, the compiled model would train without statistics, silently. Every eager-only branch.
    # Gradients to 1e-5: the penalty is rounded once when traced, and rounding differences grow
    # through three steps of GEMMs (1.7e-6 measured with the random retrieval).
    compiled_matches_eager(corpus, "aot_eager", steps=3, grad_atol=1e-5, **overrides)


@pytest.mark.slow
def test_inductor_equals_eager_without_recompiles(corpus: Tensor) -> None:
    compiled_matches_eager(corpus, "inductor", steps=3)


def test_metrics_warn_when_a_compiled_graph_bypasses_the_hooks(corpus: Tensor) -> None:
    # Dynamo does not guard on module hooks by default: a graph traced before the wrapper
    # existed keeps running without its hooks, and L2E would do nothing, silently.
    data = batches(corpus, 4, 17)
    for guard_hooks in (False, True):
        torch._dynamo.reset()
        model = PlainLM()
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=not guard_hooks):
            compiled = torch.compile(model, backend="aot_eager")
            loss_of(compiled, next(data))  # traced without hooks
            opt = wrap(model)
            opt.metrics()
            for step in range(2):
                loss_of(compiled, next(data)).backward()
                if guard_hooks or step > 0:
                    opt.step()
                else:  # the first step says so already (test below), and metrics() again
                    with pytest.warns(RuntimeWarning, match="none of the 2 sites has run"):
                        opt.step()
                opt.zero_grad()
            if guard_hooks:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    opt.metrics()
                assert all(int(s.count) > 0 for s in opt.sites.values())
            else:
                with pytest.warns(RuntimeWarning, match="2 optimizer steps .* none of the 2 hooked sites saw a token"):
                    opt.metrics()
                assert all(int(s.count) == 0 for s in opt.sites.values())



def _first_step(model: nn.Module, opt: L2EWrapper, ids: Tensor) -> None:
    loss_of(model, ids).backward()
    opt.step()


def test_first_step_warns_when_compiled_code_bypasses_the_hooks(corpus: Tensor) -> None:
    """Code Dynamo compiled before the hooks existed (for another model of the class, per block,
    or with an earlier wrapper's hooks) never calls them: the first step says so, with the fix,
    and nothing was gathered. Silent in eager mode, in the documented order (the hooks are called
    while Dynamo traces them), when hooks are guarded from the first compile on, and inside
    paused(); a step at learning rate 0 without a forward (DCP's state initialisation) is not judged."""
    ids = next(batches(corpus, 2, 8))

    def quiet_first_step(model: nn.Module, opt: L2EWrapper, gathers: bool = True) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            _first_step(model, opt, ids)
        assert all((int(s.count) > 0) == gathers for s in opt.sites.values())

    model = PlainLM(layers=2)
    quiet_first_step(model, wrap(model))  # eager
    model = PlainLM(layers=2)
    opt = wrap(model)
    with opt.paused():
        quiet_first_step(model, opt, gathers=False)  # paused on purpose: the hooks ran
    model = PlainLM(layers=2)
    opt = wrap(model)  # the documented order: wrapper first, then compile
    quiet_first_step(torch.compile(model, backend="aot_eager"), opt)

    torch._dynamo.reset()
    loss_of(torch.compile(PlainLM(layers=2), backend="aot_eager"), ids)  # another PlainLM, hook-less
    model = PlainLM(layers=2)
    opt = wrap(model)
    with pytest.warns(RuntimeWarning, match=r"none of the 2 sites has run.*torch._dynamo.reset\(\)"):
        _first_step(torch.compile(model, backend="aot_eager"), opt, ids)
    assert all(int(s.count) == 0 for s in opt.sites.values())
    with warnings.catch_warnings():  # said once
        warnings.simplefilter("error", RuntimeWarning)
        _first_step(torch.compile(model, backend="aot_eager"), opt, ids)
    opt.remove_hooks()
    opt = wrap(model)  # an earlier wrapper's hooks traced: this one's are never called
    with pytest.warns(RuntimeWarning, match="none of the 2 sites has run"):
        _first_step(torch.compile(model, backend="aot_eager"), opt, ids)

    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):  # from the first compile on
        loss_of(torch.compile(PlainLM(layers=2), backend="aot_eager"), ids)
        model = PlainLM(layers=2)
        quiet_first_step(torch.compile(model, backend="aot_eager"), wrap(model))

    torch._dynamo.reset()
    model = PlainLM(layers=2)
    block = torch.compile(model.blocks[0], backend="aot_eager")
    block(model.embed(ids[:, :-1]))  # compiled per block (as torchtitan does), then the wrapper built
    model.blocks[0] = block
    opt = L2EWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), model, sites=["blocks.0._orig_mod.mlp.2"])
    with pytest.warns(RuntimeWarning, match="none of the 1 sites has run"):
        _first_step(model, opt, ids)

    torch._dynamo.reset()
    torch.compile(tiny_gpt_neox(layers=1), backend="aot_eager")(input_ids=ids)  # a real HF class
    hf = tiny_gpt_neox(layers=1)
    opt = wrap(hf)
    with pytest.warns(RuntimeWarning, match="none of the 1 sites has run"):
        torch.compile(hf, backend="aot_eager")(input_ids=ids).logits.sum().backward()
        opt.step()

    model = PlainLM(layers=2)
    opt = wrap(model)
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step()  # DCP's lr-0 initialisation step: no forward, nothing judged
    for group in opt.param_groups:
        group["lr"] = 1e-2
    with pytest.warns(RuntimeWarning, match="not the one given to the L2EWrapper"):
        opt.step()  # a real step, and still no hook ran: the wrong model, say


class _CheckpointedLM(PlainLM):
    """PlainLM whose blocks run under non-reentrant activation checkpointing."""

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return self.head(x)


def test_compiled_checkpointed_model_counts_each_micro_batch_once(
    corpus: Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled, the tap computes its sums in the forward; checkpointing runs that forward again
    in the backward. The sums must still be added once per micro-batch, as eager adds them."""
    traced_sums: list[int] = []
    batch_sums = tap_module._batch_sums

    def spy(seen: Any) -> Any:
        traced_sums.append(int(torch.compiler.is_compiling()))
        return batch_sums(seen)

    monkeypatch.setattr(tap_module, "_batch_sums", spy)
    eager_model = PlainLM()
    compiled_model = _CheckpointedLM()
    compiled_model.load_state_dict(eager_model.state_dict())
    eager, opt = wrap(eager_model), wrap(compiled_model)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    steps = 3
    for step, ids in enumerate(batches(corpus, 4, 17, seed=3)):
        if step == steps:
            break
        loss_of(eager_model, ids).backward()
        loss_of(compiled, ids).backward()
        for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
        for o in (eager, opt):
            o.step()
            o.zero_grad()
        for a, b in zip(site_state(eager), site_state(opt)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(int(s.count) == steps * 4 * 16 for s in opt.sites.values()), "a recomputed forward counted"
    assert all(float(s.selected_fraction) > 0 for s in opt.sites.values()), "inhibition never ran"
    assert 1 in traced_sums, "the tap was not traced: the test ran the eager tap only"


def _reductions_over(graph: torch.fx.GraphModule, numel: int) -> list[str]:
    """The reductions (sum/any/all/amax...) in ``graph`` whose input has ``numel`` elements."""
    found = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        name = str(node.target).split(".")[1] if str(node.target).startswith("aten.") else str(node.target)
        if name in {"sum", "any", "all", "amax", "amin", "mean"}:
            value = node.args[0].meta.get("val")
            if isinstance(value, Tensor) and value.numel() == numel:
                found.append(str(node.target))
    return found


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_compiled_sums_stay_in_the_forward(padded: bool) -> None:
    """Under Inductor's partitioner (min cut) the tap's column sums are computed in the forward,
    where they fuse with the kernel producing z, and the backward makes no reduction over the
    activation: a sum only the backward needs would be recomputed there, a second pass over the
    saved z (measured: docs/benchmarks.md). Also: ``forward_sums`` holds what the backward adds."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, torch.fx.GraphModule] = {}

    def capture(kind: str) -> Any:
        def compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            graphs[kind] = gm
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(
        fw_compiler=capture("forward"), bw_compiler=capture("backward"),
        partition_fn=min_cut_rematerialization_partition,
    )
    tokens, n = 64, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n, generator=g, requires_grad=True)
    valid = (torch.rand(tokens, generator=g) > 0.3).float() if padded else None
    site = TapSite.pooled(torch.zeros(n), torch.ones(n), torch.tensor(2.0), torch.tensor(10), torch.tensor(5))
    acc = site.accumulator
    options = (1e-2, 1e-6, 1e-2, 0, "threshold", 0.02, 1)

    weight = torch.randn(8, n, generator=g, requires_grad=True)

    def tapped(x: Tensor) -> Tensor:  # as in an MLP: z is saved for the weight's gradient
        z = tap_module._Tap.apply(  # type: ignore[no-untyped-call]
            nn.functional.gelu(x), valid, site, options, None, None
        )
        return nn.functional.linear(z, weight)

    out = torch.compile(tapped, backend=backend, fullgraph=True)(x)
    forward_sums = site.forward_sums.clone()
    tokens_seen, selected, nonfinite = forward_sums[2 * n :].tolist()
    assert tokens_seen == (tokens if valid is None else float(valid.sum())) and nonfinite == 0.0
    assert selected > 0, "nothing selected: the count is not tested"
    out.backward(torch.randn(tokens, 8, generator=g))
    assert torch.equal(acc, forward_sums), "the backward added other sums than the forward recorded"
    assert len(_reductions_over(graphs["forward"], tokens * n)) >= 3, graphs["forward"].code
    assert _reductions_over(graphs["backward"], tokens * n) == [], graphs["backward"].code
    # Nor is a [tokens, N] mask saved for the backward (Inductor's CPU code stores bools byte by
    # byte); the backward recomputes its selection from the saved z.
    saved = [node.meta.get("val") for node in graphs["backward"].graph.nodes if node.op == "placeholder"]
    masks = [v.shape for v in saved if isinstance(v, Tensor) and v.dtype == torch.bool and v.numel() == tokens * n]
    assert masks == [], f"the forward saves a selection mask {masks}"


def test_compiled_bf16_autocast_gathers_what_eager_gathers(corpus: Tensor) -> None:
    """Under bf16 autocast the compiled tap sums bf16 activations in fp32 in the forward (and
    writes them to fp32 scratch) as eager does in the backward: same counts and selections."""
    eager_model, compiled_model = PlainLM(), PlainLM()
    compiled_model.load_state_dict(eager_model.state_dict())
    eager, opt = wrap(eager_model), wrap(compiled_model)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    for step, ids in enumerate(batches(corpus, 4, 17, seed=3)):
        if step == 3:
            break
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = loss_of(eager_model, ids), loss_of(compiled, ids)
        for loss in losses:
            loss.backward()
        for o in (eager, opt):
            o.step()
            o.zero_grad()
    for a, b in zip(eager.sites.values(), opt.sites.values()):
        assert int(a.count) == int(b.count) == 3 * 4 * 16
        assert float(a.selected_fraction) == float(b.selected_fraction) > 0
        torch.testing.assert_close(b.mean, a.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.var, a.var, rtol=1e-5, atol=1e-6)
        assert float(b.forward_sums.abs().sum()) > 0, "the compiled forward recorded no sums"
