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
    # Run from a scratch folder with no --out: a documented quick command must not touch the
    # committed docs/results or docs/figures (it writes runs/reproduce-quick).
    cwd = tmp_path_factory.mktemp("reproduce")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        reproduce.main(["all", "--quick"])
    assert not (cwd / "docs").exists()
    out = cwd / "runs" / "reproduce-quick"
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


# -- the scaling study -------------------------------------------------------------------------
def test_scaling_quick_names_all_four_arms(tmp_path: pathlib.Path) -> None:
    reproduce.main(["scaling", "--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "scaling.json").read_text())
    assert summary["arms"] == ["adamw", "l2e", "random", "memel"]
    assert summary["runs_finished"] == summary["runs_planned"] > 0 and summary["missing"] == []
    assert set(summary["corpora"]) == {"english", "code"}
    for corpus in summary["corpora"].values():
        sizes = corpus["sizes"]
        assert [s["non_embedding_params"] for s in sizes] == sorted({s["non_embedding_params"] for s in sizes})
        assert len({s["tokens"] for s in sizes}) == 1, "every size sees the same tokens"
        for size in sizes:
            assert len(size["complete_seeds"]) >= 2
            _finite(size["monosemantic_specific"]["mean"], size["monosemantic_specific"]["std"])
            for arm, v in size["arms"].items():
                _finite(v["val_loss"]["mean"], v["d_loss_vs_adamw"]["mean"], v["feature_specific_ms"]["mean"],
                        v["ks"]["mean"], v["fkr_2pct"]["mean"])
                shares = v["position_shares"]
                assert (shares is None) == (arm == "adamw")
                assert shares is None or abs(sum(shares) - 1.0) < 1e-9
            assert size["arms"]["adamw"]["d_loss_vs_adamw"]["mean"] == 0.0
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    assert "L2E - random" in (tmp_path / "scaling.md").read_text()
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    # --report rebuilds from the finished runs alone and rewrites a page's generated block in place.
    from benchmarks._scaling_report import BEGIN, END

    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nkept\n{BEGIN}\nold tables\n{END}\nalso kept\n")
    (tmp_path / "scaling.json").unlink()
    reproduce.main(["scaling", "--quick", "--report", "--out", str(tmp_path), "--section", str(page)])
    text = page.read_text()
    assert json.loads((tmp_path / "scaling.json").read_text())["runs_finished"] == summary["runs_finished"]
    assert "old tables" not in text and "L2E - random" in text and text.endswith(f"{END}\nalso kept\n")
    assert text.startswith("# Title\n\nkept\n")
    page.write_text("no markers")
    with pytest.raises(ValueError, match="no '<!-- scaling report: begin"):
        reproduce.main(["scaling", "--quick", "--report", "--out", str(tmp_path), "--section", str(page)])
    assert page.read_text() == "no markers"


def test_scaling_run_resumes_bit_for_bit_and_skips_finished(tmp_path: pathlib.Path) -> None:
    import dataclasses

    import torch

    from benchmarks import scaling
    from benchmarks._scaling_run import Job, run_job
    from l2e_optim._lab.prose import load_named

    plan = dataclasses.replace(scaling.QUICK, steps=5, checkpoint_every=100)
    corpus = load_named("english", max_bytes=plan.corpus_bytes)
    job = Job("english", 32, 1, 0, "random")  # draws from the global RNG: the checkpoint must restore it
    whole = run_job(job, plan, corpus, tmp_path / "whole", log=lambda _: None)
    assert run_job(job, plan, corpus, tmp_path / "cut", log=lambda _: None, stop_after=2) is None
    ckpt = tmp_path / "cut" / "checkpoints" / f"{job.name}.safetensors"
    assert ckpt.exists() and not (tmp_path / "cut" / "runs" / f"{job.name}.json").exists()
    torch.manual_seed(12345)  # another process history before the resume
    resumed = run_job(job, plan, corpus, tmp_path / "cut", log=lambda _: None)
    assert whole is not None and resumed is not None and resumed["resumed_from"] == [2]
    assert resumed["val_loss"] == whole["val_loss"] and resumed["position_shares"] == whole["position_shares"]
    assert resumed["train_loss_every_50"] == whole["train_loss_every_50"]
    assert not ckpt.exists(), "a finished run drops its checkpoint"
    (tmp_path / "cut" / "runs" / f"{job.name}.json").write_text(json.dumps({"val_loss": -1.0}))
    assert run_job(job, plan, corpus, tmp_path / "cut", log=lambda _: None) == {"val_loss": -1.0}  # skipped


def test_scaling_eta_scales_unmeasured_sizes() -> None:
    from benchmarks import scaling
    from benchmarks._scaling_run import Job

    remaining = [Job("code", 32, 2, 0, "l2e"), Job("code", 256, 4, 0, "l2e")]
    eta = scaling.eta_seconds(remaining, {(32, 2): [10.0, 30.0]}, workers=2)
    big = 20.0 * scaling.step_cost(256, 4) / scaling.step_cost(32, 2)
    assert eta == pytest.approx((20.0 + big) / 2)
    assert scaling.eta_seconds([], {(32, 2): [1.0]}, workers=2) == 0.0
