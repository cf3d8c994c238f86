"""The reproduction runs end to end in --quick mode; each experiment's JSON is checked."""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import reproduce  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("reproduce")
    reproduce.main(["all", "--quick", "--out", str(out), "--figures", str(out)])
    loaded = {}
    for name in reproduce.EXPERIMENTS:
        assert (out / f"{name}.png").stat().st_size > 1000, f"{name}.png missing or empty"
        loaded[name] = json.loads((out / f"{name}.json").read_text())
        assert loaded[name]["experiment"] == name and loaded[name]["quick"] is True
        assert set(loaded[name]["machine"]) >= {"date", "loadavg", "torch"}
    return loaded


def _finite(*values: float) -> None:
    for v in values:
        assert isinstance(v, (int, float)) and math.isfinite(v), v


def test_scale(results: dict[str, dict[str, Any]]) -> None:
    r = results["scale"]
    assert len(r["models"]) >= 5
    params = [m["params"] for m in r["models"]]
    assert params == sorted(params) and len(set(params)) == len(params), "models must grow"
    assert len({m["tokens"] for m in r["models"]}) == 1, "every model sees the same tokens"
    for m in r["models"]:
        assert len(m["per_layer"]) == m["layers"]
        for layer in m["per_layer"]:
            _finite(layer["feature_specific_ms"], layer["ks"], layer["high_ms_share"])
            assert 0.0 <= layer["ks"] <= 1.0
    assert -1.0 <= r["spearman_ms_vs_size"] <= 1.0


def test_fkr(results: dict[str, dict[str, Any]]) -> None:
    r = results["fkr"]
    assert r["levels"][0] == 0.005 and r["levels"][-1] == 0.1
    for s in r["scales"]:
        assert len(s["per_layer"]) == s["layers"]
        assert all(0.0 <= v <= 1.0 for curve in s["per_layer"] for v in curve)
        assert s["argmin_level"] in r["levels"]
    planted = r["planted"]
    assert all(0.0 <= v <= 1.0 for v in planted["fkr"])
    assert planted["lstar_accuracy_on_planted"] > 0.9  # the planted features are recovered


def test_compare(results: dict[str, dict[str, Any]]) -> None:
    r = results["compare"]
    assert set(r["variants"]) == set(reproduce.VARIANTS)
    assert len(r["seeds"]) >= 2
    for name, v in r["variants"].items():
        for key in ("val_loss", "feature_specific_ms", "fkr_2pct", "step_time_ratio"):
            _finite(v[key]["mean"], v[key]["std"])
        if name != "adamw":
            assert v["selected_fraction"]["mean"] > 0.0, f"{name} selected nothing"
    assert r["variants"]["adamw"]["val_loss_delta_vs_adamw"]["mean"] == 0.0
    assert r["checks"]["strength0_val_loss_equals_adamw"] is True


def test_threshold(results: dict[str, dict[str, Any]]) -> None:
    r = results["threshold"]
    assert r["sites"] and set(r["sites"]) == set(r["trace"])
    for trace in r["trace"].values():
        assert len(trace["tau"]) == len(trace["quantile"]) == len(trace["fraction"]) > 0
        assert all(q > 0 for q in trace["quantile"])
