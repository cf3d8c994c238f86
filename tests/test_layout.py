"""The package's shape: the optimizer library (``l2e_optim._src``) never imports the lab
(``l2e_optim._lab``), ``import l2e_optim`` stays light, and every module stays readable."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "l2e_optim"
LAB = "l2e_optim._lab"
MAX_LINES = 350
#: Modules that ``import l2e_optim`` must not load: the lab, and the lab's heavy dependencies.
HEAVY = (LAB, "transformers", "matplotlib")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an import statement in ``source`` may load, as absolute dotted names.

    ``from A import b`` counts as both ``A`` and ``A.b`` (``b`` may be a submodule); relative
    imports are resolved against ``module`` (a package's ``__init__`` resolves against itself).
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            origin = ".".join([*base, *([node.module] if node.module else [])])
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)
    return found


def lab_imports(path: pathlib.Path) -> list[str]:
    names = imported_modules(path.read_text(), module_name(path), is_package=path.name == "__init__.py")
    return sorted(n for n in names if n == LAB or n.startswith(LAB + "."))


def library_files() -> list[pathlib.Path]:
    return [PACKAGE / "__init__.py", *sorted((PACKAGE / "_src").rglob("*.py"))]


def test_the_library_never_imports_the_lab() -> None:
    offenders = {str(p.relative_to(ROOT)): lab_imports(p) for p in library_files() if lab_imports(p)}
    assert not offenders, f"the optimizer library imports the lab: {offenders}; move the shared code into _src"


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("from .._lab import zoo", "l2e_optim._src.wrapper"),
        ("from .._lab.zoo import PlainLM", "l2e_optim._src.wrapper"),
        ("import l2e_optim._lab.corpus", "l2e_optim._src.wrapper"),
        ("from l2e_optim import _lab", "l2e_optim._src.wrapper"),
        ("def f():\n    from ..._lab import cli", "l2e_optim._src.sub.module"),
        ("from ._lab import cli", "l2e_optim"),
    ],
)
def test_the_import_check_sees_every_spelling(source: str, module: str) -> None:
    # The static check above is only as good as this resolver: each spelling must be caught.
    names = imported_modules(source, module, is_package=module == "l2e_optim")
    assert any(n == LAB or n.startswith(LAB + ".") for n in names), names


def test_the_import_check_passes_library_imports() -> None:
    names = imported_modules("from .config import L2EConfig\nfrom . import layout", "l2e_optim._src.wrapper")
    assert names == {"l2e_optim._src.config", "l2e_optim._src.config.L2EConfig", "l2e_optim._src",
                     "l2e_optim._src.layout"}


def test_import_l2e_optim_loads_neither_the_lab_nor_heavy_dependencies() -> None:
    code = "import json, sys, l2e_optim; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert "l2e_optim._src.wrapper" in loaded  # the probe did import the library
    heavy = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert not heavy, f"`import l2e_optim` loaded {heavy}; import them lazily, inside the lab"


def test_no_module_is_longer_than_a_newcomer_can_read() -> None:
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    assert len(files) > 20
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}; split them by responsibility"


def test_architecture_page_names_every_module() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    modules = [p for part in ("_src", "_lab") for p in (PACKAGE / part).glob("*.py") if p.name != "__init__.py"]
    missing = sorted(str(p.relative_to(PACKAGE)) for p in modules if f"`{p.name}`" not in page)
    assert not missing, f"docs/architecture.md does not say what {missing} hold; add them to its tables"
