"""Tiny models and a trained toy expert, built once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moerge.contributor_client.training import TrainResult, train_expert
from tests.tiny_models import make_tiny_bert, make_tiny_llama

from .toy import toy_config, toy_examples


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a shared CPU extra threads spin and stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def toy_expert(
    tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, TrainResult]:
    """A classification expert trained once on 200 toy examples: (adapter folder, result)."""
    out_dir = tmp_path_factory.mktemp("toy-expert")
    texts, labels = toy_examples(200)
    return out_dir, train_expert(texts, labels, toy_config(tiny_bert), out_dir, progress=False)
