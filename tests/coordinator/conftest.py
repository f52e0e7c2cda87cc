"""Fixtures: a tiny base model, and a real coordinator on 127.0.0.1:0 over a real database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from moerge.coordinator.config import CoordinatorConfig
from moerge.storage.tokens import new_token
from tests.coordinator.harness import BackgroundCoordinator
from tests.tiny_models import make_tiny_bert, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


def coordinator_config(
    data_dir: Path, base_model: Path, db_url: str = "", **extra: object
) -> CoordinatorConfig:
    """Loopback, a fresh admin token, no background retraining unless ``extra`` says so."""
    _, admin = new_token("mga")
    values: dict[str, object] = {
        "data_dir": data_dir,
        "db_url": db_url,
        "listen": "127.0.0.1:0",
        "admin_token": admin,
        "base_model": str(base_model),
        "base_model_id": "tiny-bert",
        "auto_retrain": False,
    }
    values.update(extra)
    return CoordinatorConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def coordinator(tmp_path: Path, tiny_bert: Path, db_url: str) -> Iterator[BackgroundCoordinator]:
    """A coordinator over a fresh SQLite file and, in a second run, a fresh PostgreSQL database."""
    with BackgroundCoordinator(coordinator_config(tmp_path / "data", tiny_bert, db_url)) as running:
        yield running


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a chat template, for causal-LM coordinators."""
    path = make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(path))
    return path
