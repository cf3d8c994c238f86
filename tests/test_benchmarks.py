"""Each benchmark runs in its smoke mode; its JSON line is parsed and its own checks held."""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import _common, memory, selection_cost, step_only, step_overhead, tap_bytes  # noqa: E402
from l2e_optim._src.kernels import native_tap  # noqa: E402


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


@pytest.mark.parametrize("design", ["copies", "shared"])
def test_step_overhead(capsys: pytest.CaptureFixture[str], design: str) -> None:
    result = _run(step_overhead.main, capsys, "--rounds", "2", *(["--shared"] if design == "shared" else []))
    assert result["design"] == design
    arms = result["arms"]
    assert set(arms) == set(step_overhead.ARMS)
    cpu_kernel = "native" if native_tap.available() else "blocked"
    assert arms["l2e/all"]["kernel"] == cpu_kernel and arms["l2e/all/blocked"]["kernel"] == "blocked"
    assert arms["l2e/all/eager"]["kernel"] == "eager"
    assert arms["l2e/mid-2/per-position"]["kernel"] == "eager"  # per-position statistics are not fused
    assert {"l2e/mid-2/per-position", "memel/mid-2/per-position"} <= set(arms)
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


def test_gpu_check_help_and_no_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import gpu_check

    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--help"])
    assert stop.value.code == 0 and "CUDA-graph" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 0
        assert "no CUDA GPU" in capsys.readouterr().out


def test_gpu_check_harness_on_cpu(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    from benchmarks import gpu_check

    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--smoke", "--modes", "eager,captured", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert _common.parse(printed)["parts"] == result["parts"]
    eager, captured = result["parts"]
    assert set(eager["arms"]) == set(gpu_check.ARMS) and "error" not in eager
    _finite(*(arm["ratio_to_adamw"] for arm in eager["arms"].values()))
    _finite(*eager["arms"]["l2e/all"]["selected_fraction"])  # the timed arms really inhibited
    assert captured["skipped"] == "CUDA-graph capture needs a CUDA device"
    assert result["tests"] == {"skipped": "--no-tests"}


def test_byte_counter_counts_known_ops() -> None:
    a, b, c = torch.ones(100), torch.ones(100), torch.empty(100)
    with tap_bytes.ByteCounter() as counter:
        torch.add(a, b)  # reads 2 x 400 bytes, writes 400
        a.mul_(2.0)  # reads and writes a
        torch.mul(a, b, out=c)  # the out= tensor is written, not read
        a.view(10, 10).t()  # views move nothing
        a.new_zeros(50, dtype=torch.float64)  # writes 400 bytes, reads none
    assert dict(counter.by_op) == {"add": 1200, "mul_": 800, "mul": 1200, "new_zeros": 400}


def test_tap_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(tap_bytes.main, capsys)
    per = result["dtypes"]["bfloat16"]["bytes_per_value"]
    assert per["triton"] < 10 < per["eager"]  # bf16: 6 bytes of z, grad in, grad out, plus partials
    lines = result["dtypes"]["float32"]["roofline_h100"]["eager"]
    assert set(lines) == {"70m", "410m", "2.8b"}


def test_tap_time(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import tap_time

    result = _run(tap_time.main, capsys)
    _finite(result["eager_ms"], result["blocked_ms"], result["blocked_over_eager"])
    if native_tap.available():
        _finite(result["native_ms"], result["native_over_eager"])
    else:
        assert result["native_ms"] is None


def test_traced_tap(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import traced_tap

    result = _run(traced_tap.main, capsys)
    assert result["checks"] == {"taps_agree": True, "penalty_live": True, "forms_differ": True}
    _finite(*result["ms"].values())



@pytest.mark.slow
def test_compiled_breakdown(capsys: pytest.CaptureFixture[str]) -> None:
    """Both graphs compiled (Inductor, ~40 s): the L2E graph has kernels of its own and shares
    the rest with the plain one, and every timed part is reported for both arms."""
    from benchmarks import compiled_breakdown as cb

    result = _run(cb.main, capsys)
    assert result["checks"] == {"hooks_compiled": True, "sites_select": True, "own_tokens_only": True}
    kernels = result["kernels_ms"]
    assert any(adamw == 0.0 and l2e > 0.0 for adamw, l2e in kernels.values()), kernels
    assert any(adamw > 0.0 and l2e > 0.0 for adamw, l2e in kernels.values()), kernels
    for arm in ("adamw", "l2e"):
        parts = result["ms_per_step"][arm]
        _finite(*(parts[c] for c in cb.CATEGORIES if c != "other"), parts["total"])


def test_step_overhead_shared_design_catches_a_wrapper_that_was_not_paused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared design's check is live: without the pausing, an arm's sites merge the other
    arms' tokens too, and the benchmark refuses to report."""
    monkeypatch.setattr(step_overhead, "_paused_others", lambda run, wrappers, arm: run)
    monkeypatch.setattr(step_overhead, "ARMS", ["adamw", "l2e/mid-2", "l2e/all"])
    with pytest.raises(AssertionError, match="tokens merged in"):
        step_overhead.main(["--smoke", "--shared", "--rounds", "2"])
