"""Run docker-compose.yml's services as local processes, since Docker is not available in CI.

:class:`ComposeFile` reads the file with compose's own rules where they matter here:
``${VAR}``/``${VAR:-default}`` interpolation with ``$$`` as a literal ``$``, ``env_file`` then
``environment``, YAML anchors. :class:`LocalService` turns one service into a command and an
environment for this machine: each volume's container path becomes a host folder (bind mounts
stay where they are, named volumes become temp folders), and every ``HOST:PORT`` naming a
published container port becomes ``127.0.0.1:<free port>``. Nothing else is rewritten, so a
test that passes here runs the same entry points and variables the containers run.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / "moerge.env.example"
VENV_BIN = Path(sys.executable).parent
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")
_ADDRESS = re.compile(r"\b([\w.-]+):(\d+)\b")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose interpolation, applied to every string in ``value`` (recursively)."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(3)
        return variables.get(name) or (match.group(2) or "")

    return _VARIABLE.sub(substitute, value)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines; blank lines and ``#`` comments skipped (compose's env_file format)."""
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def write_env_file(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")
    return path


@dataclass
class ComposeFile:
    raw: dict[str, Any]
    variables: dict[str, str] = field(default_factory=dict)  # the shell's, for interpolation

    @classmethod
    def load(
        cls, path: Path = COMPOSE_FILE, variables: dict[str, str] | None = None
    ) -> ComposeFile:
        return cls(yaml.safe_load(path.read_text(encoding="utf-8")), dict(variables or {}))

    def service(self, name: str) -> dict[str, Any]:
        return interpolate(self.raw["services"][name], self.variables)

    def published_ports(self) -> set[int]:
        ports = set()
        for name in self.raw["services"]:
            for spec in self.service(name).get("ports", []):
                ports.add(int(str(spec).rsplit(":", 1)[-1].split("/")[0]))
        return ports


@dataclass
class LocalService:
    """One compose service as a local command line and environment."""

    name: str
    spec: dict[str, Any]
    env_files: dict[str, Path]  # env_file name in the compose file -> the file to read instead
    ports: dict[int, int]  # container port -> local port (shared by all services)
    service_names: set[str]
    volume_root: Path

    def mounts(self) -> dict[str, Path]:
        """Container path -> host path, for each entry of ``volumes``."""
        result = {}
        for entry in self.spec.get("volumes", []):
            source, target = str(entry).split(":")[:2]
            if source.startswith((".", "/")):
                result[target] = (REPO / source).resolve()
            else:
                result[target] = self.volume_root / source
                result[target].mkdir(parents=True, exist_ok=True)
        return result

    def rewrite(self, value: str) -> str:
        """Container paths -> host paths; addresses of published ports -> loopback ports."""
        for container, host in sorted(self.mounts().items(), key=lambda m: -len(m[0])):
            if value == container or value.startswith(container + "/"):
                value = str(host) + value[len(container) :]
                break
        local_hosts = {"0.0.0.0", "127.0.0.1", "localhost", *self.service_names}

        def address(match: re.Match[str]) -> str:
            host, port = match.group(1), int(match.group(2))
            if host in local_hosts and port in self.ports:
                return f"127.0.0.1:{self.ports[port]}"
            return match.group(0)

        return _ADDRESS.sub(address, value)

    def environment(self, **overrides: str) -> dict[str, str]:
        """This machine's basics, then env_file, then ``environment`` (compose's order)."""
        env = {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(self.volume_root / f"home-{self.name}"),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        }
        for name in self.spec.get("env_file", []):
            env.update(read_env_file(self.env_files[name]))
        env.update({k: self.rewrite(str(v)) for k, v in self.spec.get("environment", {}).items()})
        env.update(overrides)
        return env

    def command(self) -> list[str]:
        command = self.spec["command"]
        return [
            self.rewrite(part)
            for part in (command if isinstance(command, list) else command.split())
        ]

    def healthcheck(self) -> list[str]:
        test = self.spec["healthcheck"]["test"]
        assert test[0] == "CMD", "only exec-form healthchecks run locally"
        return [self.rewrite(part) for part in test[1:]]
