"""The code base stays as `make lint`, `ruff format` and `make typecheck` leave it, checked with
the tests so that CI (which runs the README's test command) enforces it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).with_name("ruff")


@pytest.mark.skipif(not RUFF.exists(), reason="ruff is installed with the dev extra")
@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff_finds_nothing_to_fix(command: list[str]) -> None:
    result = subprocess.run([str(RUFF), *command], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None, reason="mypy is installed with the dev extra"
)
def test_mypy_finds_no_type_errors() -> None:
    # scripts/typecheck.py runs mypy on the packages under their import names, so calls across
    # packages are checked; its cache in the temporary folder makes a second run take seconds.
    script = ROOT / "scripts" / "typecheck.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_typecheck_tree_puts_each_package_folder_under_its_import_name(tmp_path: Path) -> None:
    # mypy resolves `moerge.coordinator` only through this tree; a folder missing from it would
    # turn every call into that package into an unchecked Any.
    spec = importlib.util.spec_from_file_location("typecheck", ROOT / "scripts" / "typecheck.py")
    assert spec is not None and spec.loader is not None
    typecheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(typecheck)
    packages = typecheck.package_dirs(ROOT / "pyproject.toml")
    typecheck.build_import_tree(packages, tmp_path)
    for name, folder in packages.items():
        linked = tmp_path.joinpath(*name.split("."), "__init__.py")
        assert linked.resolve() == (folder / "__init__.py").resolve(), name
