"""``moerge coordinator health`` (the compose healthcheck) and ``--log-json`` output."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deployment.compose import VENV_BIN, free_port
from tests.deployment.conftest import Stack
from tests.deployment.processes import coordinator_process, json_log_lines, run

MOERGE = str(VENV_BIN / "moerge")


@pytest.fixture(scope="module")
def serving(
    tmp_path_factory: pytest.TempPathFactory, tiny_base_model: Path
) -> Iterator[tuple[str, dict[str, str], Path]]:
    """A coordinator started with ``--log-json`` (flag, not env) over SQLite: address, env, logs."""
    root = tmp_path_factory.mktemp("health")
    stack = Stack(root, tiny_base_model)
    env = stack.service("coordinator").environment(MOERGE_DB_URL="")
    address = env["MOERGE_LISTEN"]
    env.pop("MOERGE_LOG_JSON")
    health = [MOERGE, "coordinator", "health", "--address", address]
    with coordinator_process(
        [MOERGE, "coordinator", "serve", "--log-json"], env, health, root / "logs"
    ):
        yield address, env, root / "logs"


def test_health_exits_zero_and_prints_serving_for_a_running_coordinator(
    serving: tuple[str, dict[str, str], Path],
) -> None:
    address, env, _ = serving
    for service in ("", "moerge.v1.InferenceService"):
        result = run(
            [MOERGE, "coordinator", "health", "--address", address, "--service", service], env
        )
        assert (result.returncode, result.stdout.strip()) == (0, "SERVING")


def test_health_exits_one_for_an_unknown_service(serving: tuple[str, dict[str, str], Path]) -> None:
    address, env, _ = serving
    result = run([MOERGE, "coordinator", "health", "--address", address, "--service", "nope"], env)
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stdout


def test_health_exits_one_when_nothing_listens() -> None:
    result = subprocess.run(
        [
            MOERGE,
            "coordinator",
            "health",
            "--address",
            f"127.0.0.1:{free_port()}",
            "--timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout.startswith("UNREACHABLE")


def test_log_json_writes_one_json_object_per_stderr_line(
    serving: tuple[str, dict[str, str], Path],
) -> None:
    records = json_log_lines(serving[2] / "coordinator.err")
    assert records, "the coordinator logged nothing"
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any("coordinator listening" in str(r["msg"]) for r in records)
