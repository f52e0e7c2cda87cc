"""``moerge coordinator serve`` with ``superlink = "start"``: a managed Flower SuperLink."""

from __future__ import annotations

import socket

import pytest

from moerge.router_training.superlink import flower_binary
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator
from tests.tiny_models import make_tiny_bert


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_coordinator_starts_its_superlink_and_stops_it_on_shutdown(tmp_path):
    try:
        flower_binary("flower-superlink")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    listen = f"127.0.0.1:{_free_port()}"
    config = coordinator_config(
        tmp_path / "data",
        make_tiny_bert(tmp_path / "bert"),
        superlink="start",
        superlink_listen=listen,
    )
    with BackgroundCoordinator(config) as running:
        federation = running.state.routers.federation
        assert federation is not None and federation.address == listen
        process = federation.process.process
        assert process.poll() is None  # the SuperLink runs ...
        socket.create_connection(("127.0.0.1", int(listen.rsplit(":", 1)[1])), 2).close()
        config_toml = (tmp_path / "data" / "federation" / "flwr-home" / "config.toml").read_text()
        assert f'address = "{listen}"' in config_toml and "insecure = true" in config_toml
    assert process.poll() is not None  # ... and stops with the coordinator
    assert (tmp_path / "data" / "federation" / "superlink.log").exists()


def test_superlink_setting_must_be_off_start_or_an_address(tmp_path):
    with pytest.raises(ValueError, match="superlink"):
        coordinator_config(tmp_path, tmp_path, superlink="yes").validate()
