"""`mypy --strict` is clean on the package and the benchmarks (the configuration lives in
pyproject.toml, whose ``[tool.mypy] packages`` names both, so a bare ``mypy`` checks the same)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_mypy_strict_is_clean() -> None:
    pytest.importorskip("mypy")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "l2e_optim", "benchmarks"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_configuration_covers_the_benchmarks() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert {"l2e_optim", "benchmarks"} <= set(config["packages"]) and config["strict"] is True
