"""A real coordinator (SQLite, 127.0.0.1:0) for the client tests, and a private client home."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.coordinator.conftest import coordinator_config, tiny_bert  # noqa: F401 (fixture)
from tests.coordinator.harness import BackgroundCoordinator


@pytest.fixture(autouse=True)
def client_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the developer's ~/.config/moerge, nor sees MOERGE_* settings."""
    for name in ("MOERGE_COORDINATOR", "MOERGE_TOKEN", "MOERGE_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("MOERGE_HOME", str(home))
    return home


@pytest.fixture
def running(tmp_path: Path, tiny_bert: Path) -> Iterator[BackgroundCoordinator]:  # noqa: F811
    with BackgroundCoordinator(coordinator_config(tmp_path / "data", tiny_bert)) as coordinator:
        yield coordinator
