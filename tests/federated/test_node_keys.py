"""SuperNode keys: the coordinator's SuperLink admits the nodes of enrolled, unrevoked
contributors only (Flower's node authentication, kept in step with the registry).

One real coordinator with TLS and ``superlink = "start"``, real ``flower-supernode`` processes
and one round on the SuperLink (its ``flwr-clientapp`` imports torch): marked ``slow``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from moerge.client import Client
from moerge.contributor_client.connection import Target
from moerge.contributor_client.supernode import (
    node_key_pair,
    save_local_embeddings,
    supernode_command,
)
from moerge.errors import MoergeError
from moerge.refusals import InvalidArgument
from moerge.router_training import fit_router
from moerge.router_training.superlink import flower_binary
from moerge.storage.registry.node_keys import node_key_text
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_server import _self_signed
from tests.tiny_models import make_tiny_bert


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _client(target: Target) -> Client:
    client = Client()
    client.target = target
    return client


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


def test_node_key_text_takes_nist_ecdsa_keys_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MOERGE_HOME", str(tmp_path))
    path, public = node_key_pair()
    assert path == tmp_path / "federated" / "node-key" and path.stat().st_mode & 0o077 == 0
    assert public.startswith("ecdsa-sha2-nistp384 ")
    assert node_key_pair() == (path, public)  # created once, then reused
    assert node_key_text(public + " me@laptop\n") == public  # the comment is not the key
    with pytest.raises(InvalidArgument, match="public_key"):
        node_key_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7")
    ed25519 = Ed25519PrivateKey.generate().public_key()  # an SSH key, but not Flower's kind
    openssh = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    with pytest.raises(InvalidArgument, match="ECDSA"):
        node_key_text(ed25519.public_bytes(*openssh).decode())


@pytest.mark.slow
def test_superlink_admits_enrolled_contributors_nodes_and_refuses_revoked_and_unknown_keys(
    tmp_path, federation
):
    try:
        flower_binary("flower-superlink")
        flower_binary("flower-supernode")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    cert, key = _self_signed(tmp_path)
    listen = f"127.0.0.1:{_free_port()}"
    config = coordinator_config(
        tmp_path / "d",
        make_tiny_bert(tmp_path / "bert"),
        superlink="start",
        superlink_listen=listen,
        tls_cert=str(cert),
        tls_key=str(key),
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    nodes: dict[str, subprocess.Popen] = {}
    with BackgroundCoordinator(config) as running:
        federation_link = running.state.routers.federation
        assert federation_link is not None and federation_link.node_auth
        admin = _client(Target(running.address, running.admin_token(), str(cert)))
        contributors, keys = {}, {}
        for name in ("enrolled", "revoked", "unknown"):
            keys[name] = _key_file(tmp_path, name)
            if name == "unknown":
                continue  # its key is never registered
            client = _client(Target(running.address, "", str(cert)))
            with client:
                token = admin.create_enrollment_token(note=name)
                joined = client.join(token.token, name, save=False)
                registration = client.register_node_key(node_key_pair(keys[name])[1])
            assert registration.admitted and registration.flower_node_id > 0
            contributors[name] = (joined.contributor_id, joined.credential)
        # A key is one contributor's: another contributor cannot claim it.
        thief = _client(Target(running.address, contributors["revoked"][1], str(cert)))
        with thief, pytest.raises(MoergeError, match="ALREADY_EXISTS"):
            thief.register_node_key(node_key_pair(keys["enrolled"])[1])

        data = federation.contributors[0]
        embeddings = tmp_path / "emb.safetensors"
        save_local_embeddings(embeddings, data.embeddings)
        for name, private_key in keys.items():
            argv = supernode_command(
                listen,
                embeddings,
                data.expert_ids[0],
                root_certificates=cert,
                private_key=private_key,
                insecure=False,
                contributor_id=contributors.get(name, ("nobody",))[0],
                node_port=_free_port(),
            )
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 (the process holds it)
            nodes[name] = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        try:
            # The unregistered key is refused: Flower's SuperNode exits on a failed activation.
            _wait(lambda: nodes["unknown"].poll() is not None, 60, "unknown key still running")
            assert nodes["unknown"].returncode != 0
            assert "Failed to activate SuperNode" in (tmp_path / "unknown.log").read_text()
            online = {}

            def both_online() -> bool:
                online.update(_statuses(federation_link))
                return sum(status == "online" for status in online.values()) == 2

            _wait(both_online, 60, f"enrolled nodes not online: {online}")
            # Revoking a contributor unregisters its node at once; the node stops.
            with admin:
                admin.revoke_contributor(contributors["revoked"][0], "left the federation")
            _wait(lambda: nodes["revoked"].poll() is not None, 60, "revoked node still running")
            statuses = _statuses(federation_link)
            assert sorted(statuses.values()) == ["online", "unregistered"]
            assert nodes["enrolled"].poll() is None

            # The enrolled contributor's node takes part in a round; the revoked one does not.
            start = fit_router("federated", federation.experts, {"shrinkage": 1.0}).router
            outcome = federation_link.run_rounds(start, 1, min_nodes=1, node_wait_seconds=60)
            (record,) = outcome.participants
            assert len(record.succeeded) == 1 and not record.failed
            assert list(record.contributors.values()) == [contributors["enrolled"][0]]
        finally:
            for process in nodes.values():
                if process.poll() is None:
                    process.terminate()
                    process.wait(10)
    # The coordinator restarted: the registry is the list (the revoked key stays out).
    with BackgroundCoordinator(config) as running:
        statuses = _statuses(running.state.routers.federation)
        assert sorted(statuses.values()) in (
            ["registered", "unregistered"],
            ["offline", "unregistered"],
        )


def _key_file(folder: Path, name: str) -> Path:
    """An OpenSSH ECDSA P-384 private key, as ``moerge contributor node-key`` creates."""
    key = ec.generate_private_key(ec.SECP384R1())
    path = folder / f"{name}.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    return path


def _statuses(federation_link) -> dict[int, str]:
    """Flower's view: node id -> status, as ``flwr supernode ls`` shows it."""
    from flwr.proto.control_pb2 import ListNodesRequest

    with federation_link._control_client() as control:
        return {n.node_id: n.status for n in control.ListNodes(ListNodesRequest()).nodes_info}
