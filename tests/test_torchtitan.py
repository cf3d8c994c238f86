"""docs/distributed.md's torchtitan recipe with the real torchtitan classes (skipped without it).

torchtitan is not a dependency (its releases track PyTorch nightlies); where it is installed,
this runs the recipe's ``L2EOptimizersContainer`` on torchtitan's llama3 debug model, FSDP2 on 2
gloo ranks, saved and loaded by ``dcp`` with torchtitan's ``ModelWrapper``: the L2E state comes
back byte for byte and training continues bit-identically. Checked by hand with torchtitan 0.3.0
(``pip download --no-deps``) and torch 2.13 CPU. Not run: torchtitan's ``Trainer`` and
``CheckpointManager`` (they need its dataset and tokenizer assets; the manager calls the same
``dcp.save`` / ``dcp.load`` on the same Stateful objects), and FlexAttention, which has no CPU
backward: a causal SDPA stands in for it.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

import pytest
import torch

pytest.importorskip("torchtitan")

import torch.distributed.checkpoint as dcp  # noqa: E402
from torchtitan.components.checkpointer.base import ModelWrapper  # noqa: E402
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig  # noqa: E402
from torchtitan.components.optimizer.utils import init_optim_state, load_flat_optim_state_dict  # noqa: E402

from l2e_optim import L2EConfig, L2EWrapper  # noqa: E402
from test_distributed import WORLD, launch  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
SEQ, STEPS, MORE = 32, 3, 2


# -- the recipe, as in docs/distributed.md -------------------------------------------------------
class L2EOptimizersContainer(OptimizersContainer):  # type: ignore[misc]
    """torchtitan's OptimizersContainer with each model part's optimizer wrapped in L2EWrapper."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):  # type: ignore[misc]
        l2e_strength: float = 0.05
        l2e_ratio: float = 0.02
        l2e_warmup_steps: int = 1

    def __init__(self, config: Config, *, model_parts: list[torch.nn.Module]) -> None:
        super().__init__(config, model_parts=model_parts)
        if len(self.optimizers) != len(model_parts):
            raise ValueError("the L2E recipe wraps one optimizer per model part (one optimizer type)")
        l2e = L2EConfig(strength=config.l2e_strength, ratio=config.l2e_ratio, warmup_steps=config.l2e_warmup_steps)
        self.optimizers = [
            L2EWrapper(optim, part, config=l2e, sites=lambda name, module: name.endswith("feed_forward.w2"))
            for optim, part in zip(self.optimizers, model_parts)
        ]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Unflattening keeps only the keys the base's live state has: the L2E records are
        # loaded by name first (validated), then the base part.
        for optim in self.optimizers:
            init_optim_state(optim)
            optim.load_flat_l2e_state(state_dict)
            load_flat_optim_state_dict(optim.base_optimizer, state_dict)


# -- the run ---------------------------------------------------------------------------------------
class CausalSDPA(torch.nn.Module):
    """CPU stand-in for FlexAttention (no CPU backward in torch 2.13); same (B, L, N, H) contract."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            scale=kwargs.get("scale"), enable_gqa=kwargs.get("enable_gqa", False),
        )
        return out.transpose(1, 2)


def build(seed: int) -> tuple[torch.nn.Module, L2EOptimizersContainer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchtitan.models.llama3 import model_registry

    torch.manual_seed(seed)
    model = model_registry("debugmodel", attn_backend="flex").model.build()
    model.init_weights()
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.layers.values():
        block.attention.inner_attention = CausalSDPA()
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    adamw = ParamGroupConfig(pattern=r".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3, "weight_decay": 0.1})
    config = L2EOptimizersContainer.Config(param_groups=[adamw], implementation="for-loop")
    return model, config.build(model_parts=[model])


def train(model: torch.nn.Module, optimizers: L2EOptimizersContainer, steps: int, skip: int, rank: int) -> None:
    generator = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 2048, (2 * WORLD, SEQ + 1), generator=generator) for _ in range(skip + steps)]
    for ids in data[skip:]:
        local = ids.chunk(WORLD)[rank]
        optimizers.zero_grad()
        logits = model(local[:, :-1], torch.arange(SEQ).expand(local.shape[0], SEQ))
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), local[:, 1:].flatten()).backward()
        optimizers.step()


def snapshot(model: torch.nn.Module, optimizers: L2EOptimizersContainer) -> dict[str, Any]:
    opt = optimizers.optimizers[0]
    return {
        "l2e": {n: {k: v.clone() for k, v in s.tensors().items()} for n, s in opt.sites.items()},
        "step": opt.step_count.clone(),
        "params": {n: p.full_tensor().clone() for n, p in model.named_parameters()},
    }


def torchtitan_job(rank: int, out: pathlib.Path) -> dict[str, Any]:
    model, optimizers = build(0)
    train(model, optimizers, STEPS, 0, rank)
    saved = snapshot(model, optimizers)
    dcp.save({"model": ModelWrapper(model), "optimizer": optimizers}, checkpoint_id=str(out / "ckpt"))
    train(model, optimizers, MORE, STEPS, rank)
    continued = snapshot(model, optimizers)
    model, optimizers = build(1)
    dcp.load({"model": ModelWrapper(model), "optimizer": optimizers}, checkpoint_id=str(out / "ckpt"))
    loaded = snapshot(model, optimizers)
    train(model, optimizers, MORE, STEPS, rank)
    return {"saved": saved, "loaded": loaded, "continued": continued, "resumed": snapshot(model, optimizers)}


def test_torchtitan_recipe_resumes_exactly(tmp_path: pathlib.Path) -> None:
    for rank in launch(torchtitan_job, tmp_path):
        assert len(rank["saved"]["l2e"]) == 6  # the debug model's 6 feed_forward.w2
        for a, b in (("loaded", "saved"), ("resumed", "continued")):
            assert torch.equal(rank[a]["step"], rank[b]["step"])
            for name, site in rank[b]["l2e"].items():
                for key, value in site.items():
                    assert torch.equal(rank[a]["l2e"][name][key], value), (a, name, key)
        for name, value in rank["continued"]["params"].items():
            assert torch.equal(rank["resumed"]["params"][name], value), name
        assert any(float(s["selected_fraction"]) > 0 for s in rank["saved"]["l2e"].values())
