"""``moerge admin keys`` and ``moerge admin tokens list/revoke`` against a real coordinator."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moerge.cli import app
from tests.coordinator.harness import BackgroundCoordinator


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def test_admin_keys_create_list_and_revoke_and_the_key_may_only_infer(
    running: BackgroundCoordinator,
) -> None:
    admin = ["-c", running.address, "--token", running.admin_token()]
    created = _invoke(
        "admin", "keys", "create", "--note", "grafana", "--expires-in", "2", "--rate-limit", "30",
        *admin, "--json",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    body = json.loads(created.stdout)
    key, key_id = body["api_key"], body["key"]["key_id"]
    assert key.startswith("mgu_") and body["key"]["rate_limit_per_minute"] == 30
    listed = _invoke("admin", "keys", "list", *admin)
    assert listed.exit_code == 0 and key_id in listed.stdout and "grafana" in listed.stdout
    assert key not in listed.stdout  # the secret is shown once, at creation
    refused = _invoke("admin", "experts", "list", "-c", running.address, "--token", key)
    assert refused.exit_code == 1 and "PERMISSION_DENIED" in refused.output
    revoked = _invoke("admin", "keys", "revoke", key_id[:5], *admin)  # a unique prefix will do
    assert revoked.exit_code == 0 and f"revoked API key {key_id}" in revoked.stdout
    gone = json.loads(_invoke("admin", "keys", "list", *admin, "--json").stdout)
    assert gone["keys"][0]["revoked"] is True
    again = _invoke("admin", "keys", "revoke", key_id, *admin)
    assert again.exit_code == 1 and "already revoked" in again.output


def test_admin_tokens_list_shows_expiry_and_uses_and_revoke_marks_it(
    running: BackgroundCoordinator,
) -> None:
    admin = ["-c", running.address, "--token", running.admin_token()]
    created = json.loads(_invoke("admin", "tokens", "create", "--note", "lab", *admin,
                                 "--json").stdout)  # fmt: skip
    assert created["expires_at"]  # the coordinator's default expiry
    listed = _invoke("admin", "tokens", "list", *admin)
    assert listed.exit_code == 0 and created["token_id"] in listed.stdout
    assert "0/1" in listed.stdout and created["token"] not in listed.stdout
    revoked = _invoke("admin", "tokens", "revoke", created["token_id"][:4], *admin)
    assert revoked.exit_code == 0, revoked.output
    assert f"revoked enrollment token {created['token_id']}" in revoked.stdout
    (token,) = json.loads(_invoke("admin", "tokens", "list", *admin, "--json").stdout)["tokens"]
    assert token["revoked"] is True and token["note"] == "lab"
