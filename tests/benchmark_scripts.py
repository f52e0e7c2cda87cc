"""Import a script of ``benchmarks/`` as a module, for the tests that run it small.

The scripts are files, not a package (a top-level ``benchmarks`` package installed by opacus
would shadow the folder), so they are loaded by path. The module is registered in
``sys.modules`` under its file name, where dataclasses look their module up, and the folder is
put on ``sys.path`` for the scripts that import each other by name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

FOLDER = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``name``."""
    if str(FOLDER) not in sys.path:
        sys.path.insert(0, str(FOLDER))
    spec = importlib.util.spec_from_file_location(name, FOLDER / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
