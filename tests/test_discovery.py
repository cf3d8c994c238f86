"""Sites are found with no per-model code, for every architecture the issue names."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from l2e_optim import L2EConfig, L2EWrapper, SiteDiscoveryError
from l2e_optim._lab.zoo import MODEL_BUILDERS, VOCAB, PlainLM

EXPECTED_MID2 = {
    "gpt_neox": (["gpt_neox.layers.1.mlp.dense_4h_to_h", "gpt_neox.layers.2.mlp.dense_4h_to_h"], 128),
    "gpt2": (["transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_proj"], 128),
    "llama": (["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"], 88),
    "bert": (["bert.encoder.layer.1.output.dense", "bert.encoder.layer.2.output.dense"], 128),
    "plain": (["blocks.1.mlp.2", "blocks.2.mlp.2"], 64),
}


def train_once(arch: str, model: nn.Module) -> None:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    if arch == "plain":
        loss = model.loss(ids)  # type: ignore[operator]
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()


@pytest.mark.parametrize("arch", sorted(EXPECTED_MID2))
def test_default_sites_and_widths(arch: str) -> None:
    model = MODEL_BUILDERS[arch]()
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.01), model)
    names, width = EXPECTED_MID2[arch]
    assert list(opt.sites) == names
    assert all(site.neurons == width for site in opt.sites.values())
    train_once(arch, model)
    opt.step()
    # The hooks really fired on the hidden activation: every site counted every token (PlainLM's
    # loss feeds 11 of the 12 positions).
    tokens = 22 if arch == "plain" else 24
    assert [int(site.count) for site in opt.sites.values()] == [tokens, tokens]
    assert all(float(site.var.sum()) > 0 for site in opt.sites.values())


def test_plain_torch_transformer_encoder() -> None:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=48, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.01), model, config=L2EConfig(layers="all"))
    assert list(opt.sites) == [f"layers.{i}.linear2" for i in range(6)]
    model(torch.randn(2, 5, 16)).sum().backward()
    opt.step()
    assert all(int(site.count) == 10 for site in opt.sites.values())


@pytest.mark.parametrize(
    ("layers", "blocks"),
    [("mid-2", [2, 3]), ("mid-third", [2, 3]), ("all", [0, 1, 2, 3, 4, 5]), ((0, -1), [0, 5]), ((4,), [4])],
)
def test_layer_choices(layers: object, blocks: list[int]) -> None:
    model = PlainLM(layers=6)
    opt = L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.01), model, config=L2EConfig(layers=layers))  # type: ignore[arg-type]
    assert list(opt.sites) == [f"blocks.{i}.mlp.2" for i in blocks]


@pytest.mark.parametrize(("depth", "mid_third"), [(1, [0]), (3, [1]), (12, [4, 5, 6, 7]), (24, list(range(8, 16)))])
def test_mid_third_is_the_middle_third(depth: int, mid_third: list[int]) -> None:
    from l2e_optim._src.discovery import select_blocks

    assert select_blocks(depth, "mid-third") == mid_third
    assert len(select_blocks(depth, "mid-2")) == min(depth, 2)


def test_out_of_range_block_index_is_a_clear_error() -> None:
    model = PlainLM(layers=4)
    with pytest.raises(SiteDiscoveryError, match=r"outside the model's 4 blocks"):
        L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.01), model, config=L2EConfig(layers=(7,)))


def test_sites_by_name_and_by_callable() -> None:
    model = PlainLM(layers=4)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    by_name = L2EWrapper(sgd, model, sites=["blocks.0.mlp.2"])
    assert list(by_name.sites) == ["blocks.0.mlp.2"]
    by_name.remove_hooks()
    pick: Callable[[str, nn.Module], bool] = lambda name, module: name.endswith("mlp.2")  # noqa: E731
    by_callable = L2EWrapper(sgd, model, sites=pick)
    assert list(by_callable.sites) == [f"blocks.{i}.mlp.2" for i in range(4)]


def test_output_tap_on_up_projection_sees_pre_activations() -> None:
    model = PlainLM(layers=2)
    opt = L2EWrapper(
        torch.optim.SGD(model.parameters(), lr=0.01), model, sites=["blocks.0.mlp.0"], tap="output",
        config=L2EConfig(inhibition="none"),
    )
    captured: list[torch.Tensor] = []
    model.blocks[0].mlp[0].register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    model.loss(torch.randint(0, VOCAB, (2, 9))).backward()
    opt.step()
    expected = captured[0].reshape(-1, 64).mean(0)
    torch.testing.assert_close(opt.sites["blocks.0.mlp.0"].mean, expected)
    assert float(expected.min()) < 0  # pre-activation values, not post-GELU


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        (["blocks.9.mlp.2"], r"sites \['blocks.9.mlp.2'\] are not modules of PlainLM"),
        ("blocks.0.mlp.2", "must be a list of names, not one string"),
        ([], "selects nothing"),
        (["blocks.0.mlp.2", "blocks.0.mlp.2"], "name a module twice"),
        (lambda name, module: False, "the sites callable selected no module"),
        (["blocks.0.mlp.1"], r"cannot tell the number of neurons of site 'blocks.0.mlp.1' \(GELU\)"),
    ],
)
def test_bad_sites_are_clear_errors(sites: object, message: str) -> None:
    model = PlainLM(layers=2)
    with pytest.raises(SiteDiscoveryError, match=message):
        L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.01), model, sites=sites)  # type: ignore[arg-type]


def test_model_without_mlp_says_what_was_searched() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(SiteDiscoveryError, match=r"searched every nn.ModuleList.*Pass sites by hand"):
        L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.01), model)


def test_tap_output_needs_explicit_sites() -> None:
    model = PlainLM(layers=2)
    with pytest.raises(ValueError, match="tap='output' needs explicit sites"):
        L2EWrapper(torch.optim.SGD(model.parameters(), lr=0.01), model, tap="output")
