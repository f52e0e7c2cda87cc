"""Run mypy over every moerge package under its import name (``make typecheck``; also a test).

The top-level folders install as subpackages of ``moerge`` through ``[tool.setuptools]
package-dir`` (``coordinator/`` is ``moerge.coordinator``, ``protos/moerge/v1/`` is
``moerge.v1``). mypy cannot follow the editable install's import hook, so run on the folders it
would name ``coordinator.state`` instead of ``moerge.coordinator.state`` and leave every
cross-package import unresolved, typed ``Any``. This script therefore lays out the packages as
they install, a tree of symbolic links built from ``package-dir`` in a scratch folder, and runs
``mypy -p moerge`` there with the settings of ``[tool.mypy]`` and an incremental cache beside
the tree. Paths in mypy's messages are import paths (``moerge/coordinator/state.py``); the
table in CONTRIBUTING.md maps them back to folders.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# One scratch folder per checkout, kept between runs: the cache makes a second run take seconds.
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / (
    f"moerge-mypy-{os.getuid()}-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]}"
)


def package_dirs(pyproject: Path) -> dict[str, Path]:
    """Import name -> source folder, from ``[tool.setuptools] package-dir``."""
    config = tomllib.loads(pyproject.read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name: pyproject.parent / folder for name, folder in mapping.items()}


def build_import_tree(packages: dict[str, Path], tree: Path) -> None:
    """Rebuild ``tree`` so that ``tree/moerge/coordinator`` is ``coordinator/`` and so on.

    A package with mapped subpackages (``moerge`` itself) becomes a real folder whose entries
    link to the source one by one, so that the mapped subpackages can sit beside them; every
    other mapped package is one link to its folder. Rebuilt on each run: files come and go.
    """
    if tree.exists():
        for path in sorted(tree.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                path.rmdir()
    tree.mkdir(parents=True, exist_ok=True)
    for name in sorted(packages, key=lambda n: n.count(".")):
        target = tree.joinpath(*name.split("."))
        source = packages[name].resolve()
        children = [other for other in packages if other.startswith(name + ".")]
        if not children:
            target.symlink_to(source, target_is_directory=True)
            continue
        target.mkdir(parents=True, exist_ok=True)
        shadowed = {child.split(".")[name.count(".") + 1] for child in children}
        for entry in source.iterdir():
            if entry.name not in shadowed and entry.name != "__pycache__":
                (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())


def run_mypy(workdir: Path, extra_args: list[str]) -> int:
    """Lay out the import tree under ``workdir`` and run mypy on every package; mypy's status."""
    packages = package_dirs(ROOT / "pyproject.toml")
    tree = workdir / "tree"
    workdir.mkdir(parents=True, exist_ok=True)
    # Runs in one checkout share the folder: one at a time, or one would rebuild the other's tree.
    with open(workdir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build_import_tree(packages, tree)
        return _mypy(packages, tree, workdir / "cache", extra_args)


def _mypy(packages: dict[str, Path], tree: Path, cache: Path, extra_args: list[str]) -> int:
    roots = sorted({name.split(".")[0] for name in packages})
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    command += ["--cache-dir", str(cache), *extra_args]
    for root in roots:
        command += ["-p", root]
    # mypy searches MYPYPATH before the current folder, so the tree wins over the checkout.
    env = {**os.environ, "MYPYPATH": str(tree)}
    return subprocess.run(command, cwd=tree, env=env).returncode


def main() -> int:
    """Command line: ``python scripts/typecheck.py [--workdir DIR] [mypy options...]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args, extra = parser.parse_known_args()
    return run_mypy(args.workdir, extra)


if __name__ == "__main__":
    sys.exit(main())
