"""The demo and analyze commands end to end in smoke mode, and every bad-input case."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import BAD_DATA, bad_data
from l2e_optim import load_checkpoint
from l2e_optim._lab.cli import main
from l2e_optim._lab.pretrain import METHODS, RunResult
from l2e_optim._lab.zoo import build_model

SMOKE = ["--smoke", "--no-progress"]
TABLE_FIELDS = ["train loss", "train ppl", "val loss", "val ppl", "tokens/s", "step time / adamw",
                "high-MS share", "FKR@2%", "final threshold", "selected fraction"]


def finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["demo", *SMOKE, "--out", str(out)]) == 0
    return out, buffer.getvalue()


def test_demo_table_and_summary(demo_run: tuple[Path, str]) -> None:
    out, printed = demo_run
    for field in TABLE_FIELDS:
        assert field in printed
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]) == list(METHODS)
    for method, run in summary["runs"].items():
        for key in ("train_loss", "train_ppl", "val_loss", "val_ppl", "tokens_per_second", "step_time_ratio",
                    "high_ms_share", "fkr_2pct"):
            assert finite(run[key]), (method, key, run[key])
        assert 0.0 <= run["high_ms_share"] <= 1.0 and 0.0 <= run["fkr_2pct"] <= 1.0
        assert math.isclose(run["val_ppl"], math.exp(run["val_loss"]), rel_tol=1e-9)
        assert (run["sites"] == {}) == (method == "adamw")
        for site in run["sites"].values():
            assert finite(site["threshold"]) and site["threshold"] > 0
            assert 0.0 <= site["selected_fraction"] <= 1.0
    assert summary["runs"]["adamw"]["step_time_ratio"] == 1.0
    assert summary["wall_seconds"] > 0
    png = (out / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_demo_checkpoints_load(demo_run: tuple[Path, str]) -> None:
    from transformers import AutoModelForCausalLM

    from l2e_optim._lab.pretrain import RunSpec, setup

    out, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    settings = summary["settings"]
    for method in METHODS:
        weights = load_file(str(out / method / "model.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(str(out / method))
        for name, value in model.state_dict().items():
            assert torch.equal(value, weights[name]), name
        spec = RunSpec(method=method, shape=settings["shape"], steps=settings["steps"],
                       batch_size=settings["batch_size"], seq_len=settings["seq_len"],
                       width=settings["width"], layers=settings["layers"])
        fresh = setup(spec)
        load_checkpoint(out / method / "checkpoint.safetensors", fresh.optimizer, model=fresh.model,
                        scheduler=fresh.scheduler)
        assert fresh.scheduler.last_epoch == settings["steps"]
        for name, value in fresh.model.state_dict().items():
            assert torch.equal(value, weights[name]), name


@pytest.mark.parametrize("target", ["l2e", "l2e/model.safetensors", "l2e/checkpoint.safetensors"])
def test_analyze_demo_checkpoint(demo_run: tuple[Path, str], tmp_path: Path, target: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = demo_run
    code = main(["analyze", str(out / target), "--seq-len", "32", "--tokens", "512", "--top", "3",
                 "--max-bytes", "40000", "--no-progress", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0
    for field in ("mean MS", "median neuron MS", "high-MS share", "FKR@0.5%", "FKR@10%", "K-S", "top contexts"):
        assert field in printed
    result = json.loads((tmp_path / "analysis.json").read_text())
    assert result["tokens"] == 512 and len(result["layers"]) == 2
    assert all(finite(row["mean_ms"]) and finite(row["max_neuron_ms"]) for row in result["layers"])
    assert all(0.0 <= v <= 1.0 for values in result["fkr"]["per_site"].values() for v in values)
    assert len(result["fkr"]["mean"]) == len(result["fkr"]["ratios"]) == 6
    assert result["ks"]["mean"] and all(0.0 <= v <= 1.0 for v in result["ks"]["mean"].values())
    assert len(result["top_neurons"]) == 3
    assert all("[" in e["context"] and e["feature"] for n in result["top_neurons"] for e in n["examples"])
    assert (tmp_path / "analysis.png").read_bytes().startswith(b"\x89PNG")


def test_analyze_save_pretrained_folder_on_plain_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = build_model("tiny", width=32, layers=2, seed=1)
    model.save_pretrained(str(tmp_path / "model"))
    text = tmp_path / "prose.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    code = main(["analyze", str(tmp_path / "model"), "--data", str(text), "--seq-len", "32", "--tokens", "256",
                 "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0 and "not available" in printed
    result = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert result["fkr"] is None and result["ks"] is None
    assert all(e["feature"] is None for n in result["top_neurons"] for e in n["examples"])


def run_bad(argv: list[str], capsys: pytest.CaptureFixture[str], expected: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err
    assert expected in err, err


@pytest.mark.parametrize("case", BAD_DATA)
def test_demo_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    path = bad_data(tmp_path, case)
    run_bad(["demo", *SMOKE, "--data", str(path), "--out", str(tmp_path / "out")], capsys, case)


def test_demo_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_bad(["demo", *SMOKE, "--model", "pythia-7b", "--out", str(tmp_path)], capsys, "known models: tiny")


def test_output_folder_not_writable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a folder below a file cannot exist, even for root
    run_bad(["demo", *SMOKE, "--out", str(blocker / "out")], capsys, "not writable")


def test_analyze_missing_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_bad(["analyze", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], capsys, "does not exist")


@pytest.mark.parametrize("as_file", [False, True])
def test_analyze_checkpoint_of_another_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             as_file: bool) -> None:
    folder = tmp_path / "model"
    build_model("tiny", width=32, layers=2).save_pretrained(str(folder))
    other = build_model("tiny", width=64, layers=2)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(folder / "model.safetensors"))
    target = folder / "model.safetensors" if as_file else folder
    code = main(["analyze", str(target), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert ("another model" in err) if as_file else ("cannot load" in err or "another model" in err), err


def test_ctrl_c_stops_cleanly_and_keeps_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupt(step: int, result: RunResult) -> None:
        if result.spec.method == "l2e" and step == 2:
            raise KeyboardInterrupt

    code = main(["demo", *SMOKE, "--out", str(tmp_path)], on_step=interrupt)
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err and "interrupted at step 2/4" in err
    assert (tmp_path / "adamw" / "checkpoint.safetensors").is_file()
    assert not (tmp_path / "memel").exists() and not (tmp_path / "summary.json").exists()
    from l2e_optim._lab.pretrain import RunSpec, setup

    fresh = setup(RunSpec(method="l2e", steps=4, batch_size=2, seq_len=32, width=32, layers=2))
    loaded = load_checkpoint(tmp_path / "l2e" / "checkpoint.safetensors", fresh.optimizer, model=fresh.model,
                             scheduler=fresh.scheduler)
    assert fresh.scheduler.last_epoch == 2
    assert loaded.metadata["interrupted"] is True and loaded.metadata["steps_done"] == 2


def test_module_entry_point_reports_bad_input_without_traceback() -> None:
    done = subprocess.run([sys.executable, "-m", "l2e_optim", "demo", "--model", "nope", "--smoke"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown model 'nope'" in done.stderr and "Traceback" not in done.stderr


def test_analyze_subword_model_uses_its_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from l2e_optim._lab.corpus import load_corpus

    sample = bytes(load_corpus(max_bytes=30_000).train.tolist()).decode("utf-8", errors="ignore")
    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator([sample], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    folder = tmp_path / "subword"
    build_model("tiny", width=32, layers=2, vocab_size=len(tokenizer)).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    code = main(["analyze", str(folder), "--seq-len", "32", "--tokens", "256", "--max-bytes", "40000",
                 "--top", "2", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert result["token_unit"] == "tokenizer tokens" and result["tokens"] == 256
    assert result["fkr"] is not None and all(0.0 <= v <= 1.0 for v in result["fkr"]["mean"])
    assert all(e["feature"] and "[" in e["context"] for n in result["top_neurons"] for e in n["examples"])


def test_demo_on_plain_text_reports_fkr_not_available(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes"
    text.mkdir()
    for i in range(3):
        (text / f"part{i}.txt").write_text(f"Chapter {i}. It was a bright cold day in April. " * 40)
    code = main(["demo", *SMOKE, "--methods", "adamw,l2e", "--data", str(text), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["runs"]) == ["adamw", "l2e"]
    for run in summary["runs"].values():
        assert run["fkr_2pct"] is None and run["analysis"]["fkr"] is None
        assert finite(run["val_loss"]) and finite(run["high_ms_share"])
    assert "n/a" in printed


def test_sigint_to_the_process_stops_at_a_step_boundary_and_saves(tmp_path: Path) -> None:
    import re
    import signal
    import time

    from l2e_optim._lab.pretrain import RunSpec, setup

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "l2e_optim", "demo", *SMOKE, "--steps", "5000", "--methods", "l2e", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 90
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the output folder appears once the Ctrl-C handler is in place
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130 and "Traceback" not in err, err
    match = re.search(r"interrupted at step (\d+)/5000", err)
    assert match, err
    fresh = setup(RunSpec(method="l2e", steps=5000, batch_size=2, seq_len=32, width=32, layers=2))
    loaded = load_checkpoint(out / "l2e" / "checkpoint.safetensors", fresh.optimizer, model=fresh.model,
                             scheduler=fresh.scheduler)
    assert loaded.metadata["steps_done"] == int(match.group(1)) == fresh.scheduler.last_epoch


def test_bad_threads_and_methods_and_main_restores_threads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.get_num_threads()
    run_bad(["demo", *SMOKE, "--threads", "0", "--out", str(tmp_path)], capsys, "--threads=0")
    run_bad(["demo", *SMOKE, "--methods", "adamw,sgd", "--out", str(tmp_path)], capsys, "--methods")
    assert torch.get_num_threads() == before


# -- what a new user hit (issue 11) ---------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (["--lr", "-1"], "--lr=-1.0 must be a finite number > 0"),
    (["--lr", "nan"], "--lr=nan must be a finite number > 0"),
    (["--steps", "-1"], "--steps=-1 must be >= 1"),
    (["--seq-len", "0"], "--seq-len=0 must be >= 1"),
])
def test_bad_demo_numbers_get_one_line_errors_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    run_bad(["demo", *SMOKE, *flags, "--out", str(tmp_path)], capsys, expected)
    assert len(capsys.readouterr().err.strip().splitlines()) <= 1


def test_top_level_help_describes_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "monosemantic" in printed and "'demo' pretrains" in printed and "'analyze'" in printed
    assert "thin shell" not in printed and "``" not in printed  # not the module's internal docstring


def test_analyze_writes_beside_each_target_by_default(demo_run: tuple[Path, str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = demo_run
    monkeypatch.chdir(tmp_path)
    common = ["--seq-len", "32", "--tokens", "256", "--top", "2", "--max-bytes", "40000", "--no-progress"]
    for target in ("l2e", "adamw", "l2e/checkpoint.safetensors"):
        assert main(["analyze", str(out / target), *common]) == 0
    written = sorted(p.parent.name for p in (tmp_path / "runs" / "analyze").glob("*/analysis.json"))
    assert written == ["adamw", "l2e", "l2e-checkpoint"]


def test_demo_labels_memel_thresholds_as_monitoring(demo_run: tuple[Path, str]) -> None:
    _, printed = demo_run
    assert "memel*" in printed and "tracked for monitoring only" in printed
    summary = json.loads((demo_run[0] / "summary.json").read_text())
    assert summary["runs"]["memel"]["sites_role"] == "monitor" and summary["runs"]["l2e"]["sites_role"] == "inhibits"


def test_demo_figure_plots_validation_loss_against_adamw() -> None:
    from l2e_optim._lab.report import val_loss_gaps

    curves = {"adamw": {"val_loss": [(2, 5.50), (4, 5.00)]}, "l2e": {"val_loss": [(2, 5.49), (4, 5.02)]},
              "memel": {"val_loss": [(2, 5.51), (4, 4.97)]}}
    gaps = val_loss_gaps(curves)
    assert list(gaps) == ["l2e", "memel"] and gaps["l2e"][0] == [2, 4]
    assert [round(v, 6) for v in gaps["l2e"][1]] == [-0.01, 0.02]
    assert [round(v, 6) for v in gaps["memel"][1]] == [0.01, -0.03]
    assert val_loss_gaps({"l2e": curves["l2e"]}) == {}


@pytest.mark.parametrize("data", ["english", "mixed"])
def test_demo_on_builtin_corpora_names_their_features(tmp_path: Path, data: str) -> None:
    from l2e_optim._lab.prose import ENGLISH_FEATURES, MIXED_FEATURES

    code = main(["demo", *SMOKE, "--methods", "adamw,l2e", "--data", data, "--out", str(tmp_path / "out")])
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    names = list(ENGLISH_FEATURES if data == "english" else MIXED_FEATURES)
    assert summary["settings"]["features"] == names and summary["settings"]["data"] == [data]
    for run in summary["runs"].values():
        assert finite(run["fkr_2pct"])
        assert set(run["analysis"]["ks"]["mean"]) <= set(names) and run["analysis"]["ks"]["mean"]
        assert {ex["feature"] for n in run["analysis"]["top_neurons"] for ex in n["examples"]} <= set(names)


def test_data_name_loses_to_an_existing_file_of_that_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from l2e_optim._lab.cli import load_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "english").write_text("only this file. " * 40)
    corpus = load_data(["english"], max_bytes=10_000)
    assert corpus.sources == ("english",) and corpus.train_features is None
