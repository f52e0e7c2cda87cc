"""``moerge coordinator serve --check`` with the compose coordinator's environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deployment.compose import free_port
from tests.deployment.conftest import Stack
from tests.deployment.processes import run
from tests.deployment.test_compose import coordinator_env

CHECK = ["moerge", "coordinator", "serve", "--check"]


@pytest.mark.postgres
def test_check_passes_against_a_reachable_postgresql(stack: Stack, fresh_postgres_url: str) -> None:
    result = run(CHECK, coordinator_env(stack, fresh_postgres_url))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ok] database: reachable" in result.stdout
    assert "[ok] base model" in result.stdout


def test_check_exits_one_when_the_database_is_unreachable(stack: Stack, tmp_path: Path) -> None:
    unreachable = f"postgresql+psycopg://moerge:moerge@127.0.0.1:{free_port()}/moerge"
    env = coordinator_env(stack, unreachable)
    env["PGCONNECT_TIMEOUT"] = "3"
    result = run(CHECK, env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[FAIL] database" in result.stdout
    assert not (tmp_path / "volumes" / "coordinator-data" / "registry.db").exists()
