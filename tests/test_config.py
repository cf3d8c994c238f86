"""L2EConfig validates every option with an error that names the value and the fix."""

from __future__ import annotations

import dataclasses

import pytest

from l2e_optim import ConfigError, L2EConfig


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("inhibition", "dropout", "inhibition='dropout' is not one of"),
        ("ratio", 0.0, r"ratio=0.0 must lie in \(0, 1\)"),
        ("ratio", 1.5, "ratio=1.5 must lie in"),
        ("strength", -1.0, "strength=-1.0 must be a finite number >= 0"),
        ("strength", float("nan"), "strength=nan"),
        ("eps", -0.1, "eps=-0.1"),
        ("log_eps", 0.0, "log_eps=0.0 must be a finite number > 0"),
        ("forget_steps", 0, r"forget_steps=0 must be an integer >= 1 \(or None"),
        ("forget_steps", 2.5, "forget_steps=2.5"),
        ("warmup_steps", -1, "warmup_steps=-1 must be an integer >= 0"),
        ("layers", "middle", "layers='middle' is not one of"),
        ("layers", (), "non-empty sequence"),
        ("layers", (1, 1), "repeats a block index"),
        ("layers", (True,), "non-empty sequence of block indices"),
        ("memel_topk", 0, "memel_topk=0 must be an integer >= 1"),
        ("memel_scale", -1.0, "memel_scale=-1.0"),
        ("grad_accumulation_steps", 0, "grad_accumulation_steps=0"),
        ("threshold_lr", 0.0, "threshold_lr=0.0 must be a finite number > 0"),
        ("threshold_init", -3.0, "threshold_init=-3.0"),
        ("retrieval", "lottery", "retrieval='lottery' is not one of"),
        ("statistics", "per-token", r"statistics='per-token' is not one of \('pooled', 'per-position'\)"),
        ("max_positions", 0, r"max_positions=0 must be an integer >= 1 \(set it to the context length\)"),
        ("max_positions", 16.0, "max_positions=16.0 must be an integer"),
        ("retrieval", "sample_topk", r"retrieval='sample_topk' is not one of \('auto', 'threshold', 'sample-topk'"),
    ],
)
def test_bad_values_name_the_field_and_range(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        L2EConfig(**{field: value})  # type: ignore[arg-type]


def test_defaults_are_the_papers() -> None:
    config = L2EConfig()
    assert (config.inhibition, config.ratio, config.eps, config.forget_steps) == ("l2e", 0.02, 0.01, 10)
    assert (config.layers, config.memel_topk, config.memel_scale) == ("mid-2", 1, 1.0)
    assert config.resolved_retrieval == "threshold"
    # MEmeL's official retrieval: per sequence; the per-token ranking is an opt-in variant.
    assert L2EConfig(inhibition="memel").resolved_retrieval == "sample-topk"
    assert L2EConfig(inhibition="memel", retrieval="token-topk").resolved_retrieval == "token-topk"
    assert L2EConfig(retrieval="sample-topk").resolved_retrieval == "sample-topk"
    assert L2EConfig(inhibition="memel", retrieval="threshold").resolved_retrieval == "threshold"
    assert L2EConfig(retrieval="random").resolved_retrieval == "random"
    assert (config.statistics, config.statistic_rows) == ("pooled", None)
    assert L2EConfig(statistics="per-position", max_positions=64).statistic_rows == 65


def test_frozen_and_keyword_only() -> None:
    config = L2EConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ratio = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        L2EConfig("l2e")  # type: ignore[misc]


def test_layer_lists_become_tuples_and_round_trip_through_dict() -> None:
    config = L2EConfig(layers=[0, -1], forget_steps=None, threshold_init=4.0, retrieval="batch-topk")  # type: ignore[arg-type]
    assert config.layers == (0, -1)
    assert L2EConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["layers"] == [0, -1]


def test_from_dict_names_unknown_fields() -> None:
    with pytest.raises(ConfigError, match=r"unknown L2EConfig fields \['lambda_'\]"):
        L2EConfig.from_dict({"lambda_": 1.0})
