"""Each benchmark runs in its smoke mode; its JSON line is parsed and its own checks held."""

from __future__ import annotations

import math
import pathlib
import sys
from typing import Any

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import _common, memory, selection_cost, step_only, step_overhead  # noqa: E402


def _run(main: Any, capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    main(["--smoke", *argv])
    out = capsys.readouterr().out
    result = _common.parse(out)
    assert result["smoke"] is True
    assert set(result["machine"]) >= {"date", "loadavg", "torch", "cpus", "threads"}
    assert all(result["checks"].values()), result["checks"]
    assert "-----" in out  # the human table came first
    return result


def _finite(*values: float) -> None:
    for v in values:
        assert isinstance(v, float) and math.isfinite(v) and v > 0, v


def test_step_overhead(capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(step_overhead.main, capsys, "--rounds", "2")
    arms = result["arms"]
    assert set(arms) == {"adamw", "l2e/mid-2", "l2e/all", "memel/mid-2", "memel/all", "l2e/mid-2/per-position",
                         "memel/mid-2/per-position"}
    assert arms["adamw"]["ratio_to_adamw"] == 1.0
    for arm in arms.values():
        _finite(arm["median_cpu_s"], arm["ratio_to_adamw"], arm["wall_ratio_to_adamw"])
    assert arms["l2e/mid-2"]["sites"] == 2 and arms["l2e/all"]["sites"] == 4
    assert isinstance(arms["l2e/mid-2"]["target_met"], bool)


def test_selection_cost(capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(selection_cost.main, capsys, "--max-log-n", "12", "--converge-steps", "200")
    assert [row["neurons"] for row in result["rows"]] == [2**12]
    for row in result["rows"]:
        _finite(row["threshold_s"], row["topk_s"], row["speedup"])
        assert abs(row["fraction_threshold"] - result["ratio"]) < 0.15 * result["ratio"]
    assert abs(result["tau"] - result["tau_exact_chi2"]) < 0.1 * result["tau_exact_chi2"]


def test_step_only(capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(step_only.main, capsys, "--rounds", "3")
    arms = result["arms"]
    assert set(arms) == {"adamw-foreach", "adamw-fused", "l2e+foreach", "l2e+fused", "commit-only"}
    for arm in arms.values():
        _finite(arm["median_cpu_s"], arm["ratio_to_adamw_foreach"])
    _finite(arms["l2e+fused"]["ratio_to_adamw_fused"])


def test_memory(capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(memory.main, capsys)
    arms = result["arms"]
    assert set(arms) == {"adamw", "l2e/mid-2", "l2e/all"}
    for name in ("l2e/mid-2", "l2e/all"):
        per_neuron = arms[name]["state_bytes_per_neuron"]
        assert 16.0 <= per_neuron <= result["targets"]["state_bytes_per_neuron"]
        _finite(arms[name]["peak_rss_mib"], arms[name]["footprint_ratio"])
