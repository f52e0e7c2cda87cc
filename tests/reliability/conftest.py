"""Fixtures for the fault tests: a tiny base model and a pool of distinct, valid experts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.experts import make_expert_dir
from tests.tiny_models import make_tiny_bert

POOL_SIZE = 24


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def expert_pool(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> list[Path]:
    """Experts with different weights and statistics (rank 32: ~50 KB, many chunks each)."""
    root = tmp_path_factory.mktemp("experts")
    return [
        make_expert_dir(tiny_bert, root / f"e{i}", rank=32, seed=i, task_name=f"task{i}")
        for i in range(POOL_SIZE)
    ]
