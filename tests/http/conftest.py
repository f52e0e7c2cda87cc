"""Real coordinators with the HTTP API on 127.0.0.1:0: a causal LM and a classifier, each with
two uploaded experts, and helpers to call them with plain HTTP (httpx)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from tests.coordinator.causal_lm import TINY_LLAMA_SETTINGS
from tests.coordinator.conftest import coordinator_config, tiny_bert, tiny_llama  # noqa: F401
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir


@dataclass
class Served:
    """A running coordinator, its HTTP base URL and a contributor's credential."""

    running: BackgroundCoordinator
    contributor_token: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.running.running.http_port}"

    @property
    def admin_token(self) -> str:
        return self.running.admin_token()

    def client(self, token: str | None = None) -> httpx.Client:
        """httpx against the API, authenticated as the admin unless ``token`` says otherwise."""
        token = self.admin_token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


def _serve(root: Path, base_model: Path, **config: object) -> Iterator[Served]:
    task_type = str(config.get("task_type", "classification"))
    settings = coordinator_config(root / "data", base_model, http_listen="127.0.0.1:0", **config)
    with BackgroundCoordinator(settings) as running:
        _, credential = enroll(running.address, running.admin_token(), "lab")
        target = Target(address=running.address, token=credential)
        for i in range(2):
            extra = {"labels": (("neg", "pos"), ("sport", "tech", "money"))[i]}
            if task_type == "causal_lm":
                extra = {"task_type": "causal_lm", "rank": 4}
            folder = make_expert_dir(
                base_model, root / f"e{i}", seed=10 + i, task_name=f"task{i}", **extra
            )
            upload_expert(target, folder, f"expert{i}", f"task{i}", progress=False)
        yield Served(running, credential)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Served]:  # noqa: F811
    """A causal-LM coordinator (tiny Llama with a chat template) serving HTTP."""
    yield from _serve(tmp_path_factory.mktemp("http-lm"), tiny_llama, **TINY_LLAMA_SETTINGS)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Iterator[Served]:  # noqa: F811
    """A classification coordinator (tiny BERT) serving HTTP."""
    yield from _serve(tmp_path_factory.mktemp("http-cls"), tiny_bert)
