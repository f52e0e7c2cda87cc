"""The ``http_listen`` setting: off by default, HOST:PORT checked, a busy port stops the start,
the API stops with the coordinator, and with a TLS certificate it speaks HTTPS only."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest

from moerge.coordinator.config import CoordinatorConfig
from tests.coordinator.conftest import coordinator_config, tiny_bert  # noqa: F401
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_server import _self_signed


def test_http_is_off_by_default_and_set_by_env_or_flag(
    monkeypatch: pytest.MonkeyPatch,
    tiny_bert: Path,  # noqa: F811
) -> None:
    assert CoordinatorConfig(base_model=str(tiny_bert)).http_listen == ""
    monkeypatch.setenv("MOERGE_HTTP_LISTEN", "0.0.0.0:8000")
    assert CoordinatorConfig.load(base_model=str(tiny_bert)).http_listen == "0.0.0.0:8000"
    assert (
        CoordinatorConfig.load(base_model=str(tiny_bert), http_listen="127.0.0.1:0").http_listen
        == "127.0.0.1:0"
    )
    with pytest.raises(ValueError, match="http_listen must be HOST:PORT"):
        CoordinatorConfig.load(base_model=str(tiny_bert), http_listen="8000")


def test_without_http_listen_no_http_port_is_open(tmp_path: Path, tiny_bert: Path) -> None:  # noqa: F811
    with BackgroundCoordinator(coordinator_config(tmp_path / "data", tiny_bert)) as running:
        assert running.running.http is None and running.running.http_port is None


def test_a_busy_http_port_stops_the_start(tmp_path: Path, tiny_bert: Path) -> None:  # noqa: F811
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        config = coordinator_config(tmp_path / "data", tiny_bert, http_listen=f"127.0.0.1:{port}")
        coordinator = BackgroundCoordinator(config)
        with pytest.raises(OSError), coordinator:
            pass
        coordinator.loop.call_soon_threadsafe(coordinator.loop.stop)


def test_the_http_api_stops_with_the_coordinator(tmp_path: Path, tiny_bert: Path) -> None:  # noqa: F811
    config = coordinator_config(tmp_path / "data", tiny_bert, http_listen="127.0.0.1:0")
    with BackgroundCoordinator(config) as running:
        url = f"http://127.0.0.1:{running.running.http_port}/v1/models"
        assert httpx.get(url).status_code == 401  # up, and asking for a credential
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)


def test_with_a_tls_certificate_http_is_https_only(tmp_path: Path, tiny_bert: Path) -> None:  # noqa: F811
    cert, key = _self_signed(tmp_path)
    config = coordinator_config(
        tmp_path / "data",
        tiny_bert,
        tls_cert=str(cert),
        tls_key=str(key),
        http_listen="127.0.0.1:0",
    )
    with BackgroundCoordinator(config) as running:
        port = running.running.http_port
        headers = {"Authorization": f"Bearer {config.admin_token}"}
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as client:
            response = client.get(f"https://localhost:{port}/v1/models", headers=headers)
        assert response.status_code == 200 and response.json()["data"][0]["id"] == "moerge"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers, timeout=5)
