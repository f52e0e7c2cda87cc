"""The CLI starts fast: its top-level import, and ``import moerge``, pull in no heavy library.

Each check runs in a fresh interpreter, since this test process may already hold torch.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "flwr", "safetensors", "sqlalchemy")


def _loaded_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "statement", ["import moerge.cli", "import moerge", "from moerge import __version__"]
)
def test_importing_the_cli_or_the_package_loads_no_heavy_library(statement: str) -> None:
    loaded = _loaded_after(statement)
    assert not {name for name in loaded if name.split(".")[0] in HEAVY}


def test_import_moerge_loads_neither_grpc_nor_the_client() -> None:
    loaded = _loaded_after("import moerge")
    assert "grpc" not in loaded and "moerge.client" not in loaded


def test_help_version_and_admin_list_run_without_heavy_imports() -> None:
    """The three commands a health check or a new user runs first stay off torch and flwr."""
    for argv in (["--help"], ["version"], ["admin", "experts", "list", "-c", "127.0.0.1:1"]):
        code = (
            "import json, sys\n"
            "from moerge.cli import app\n"
            f"try: app({argv!r})\n"
            "except SystemExit: pass\n"
            "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        loaded = set(json.loads(result.stderr.strip().splitlines()[-1]))
        assert not {name for name in loaded if name.split(".")[0] in HEAVY}, argv


def test_the_flower_client_app_is_still_built_on_first_access() -> None:
    """``supernode:app`` is the FAB's ClientApp reference: lazy, but it must still resolve."""
    from flwr.clientapp import ClientApp

    from moerge.contributor_client import supernode

    assert isinstance(supernode.app, ClientApp)
    assert supernode.app is supernode.app
