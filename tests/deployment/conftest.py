"""Fixtures for the deployment tests: a tiny base model and a compose stack's local pieces."""

from __future__ import annotations

from pathlib import Path

import pytest

from moerge.storage.tokens import new_token
from tests.deployment.compose import (
    ENV_EXAMPLE,
    ComposeFile,
    LocalService,
    free_port,
    read_env_file,
    write_env_file,
)
from tests.tiny_models import make_tiny_bert


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT instead of MiniLM, so that the contributors train in seconds."""
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


class Stack:
    """docker-compose.yml with its env file, ports and volumes mapped onto this machine."""

    def __init__(self, root: Path, base_model: Path) -> None:
        self.compose = ComposeFile.load()
        self.ports = {port: free_port() for port in self.compose.published_ports()}
        self.root = root
        self.admin_token = new_token("mga")[1]
        self.env_values = {
            **read_env_file(ENV_EXAMPLE),
            "MOERGE_ADMIN_TOKEN": self.admin_token,
            "MOERGE_BASE_MODEL": str(base_model),
        }
        self.env_file = write_env_file(root / "moerge.env", self.env_values)

    def set_env(self, key: str, value: str) -> None:
        """Edit moerge.env, as the operator does (e.g. to add the enrollment token)."""
        self.env_values[key] = value
        write_env_file(self.env_file, self.env_values)

    def service(self, name: str) -> LocalService:
        return LocalService(
            name=name,
            spec=self.compose.service(name),
            env_files={"moerge.env": self.env_file},
            ports=self.ports,
            service_names=set(self.compose.raw["services"]),
            volume_root=self.root / "volumes",
        )


@pytest.fixture
def stack(tmp_path: Path, tiny_base_model: Path) -> Stack:
    return Stack(tmp_path, tiny_base_model)
