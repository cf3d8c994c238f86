"""The public API is exactly __all__, each symbol documented in code and in docs/api.md."""

from __future__ import annotations

import pathlib

import l2e_optim

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_public_symbol_has_a_docstring_and_a_docs_entry() -> None:
    api = (ROOT / "docs" / "api.md").read_text()
    for name in l2e_optim.__all__:
        obj = getattr(l2e_optim, name)
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
        assert f"`{name}" in api, f"{name} is missing from docs/api.md"


def test_public_wrapper_methods_are_documented() -> None:
    api = (ROOT / "docs" / "api.md").read_text()
    for name, member in vars(l2e_optim.L2EWrapper).items():
        if name.startswith("_"):
            continue
        assert (getattr(member, "__doc__", None) or "").strip(), f"L2EWrapper.{name} has no docstring"
        assert f"`{name}" in api, f"L2EWrapper.{name} is missing from docs/api.md"


def test_package_ships_py_typed() -> None:
    assert (ROOT / "l2e_optim" / "py.typed").exists()
