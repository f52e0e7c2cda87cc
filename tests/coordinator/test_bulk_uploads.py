"""The bulk data channel through a real coordinator: commit, resume, tickets, limits, TLS, fallback.

Everything runs over loopback against a coordinator on a real SQLite file; the raw-protocol
tests speak :mod:`moerge.bulk_protocol` on a plain socket, as a hostile client would.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moerge.bulk_protocol import Reply, Request, read_reply
from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import (
    BulkUnavailable,
    describe_files,
    make_manifest,
    upload_expert,
)
from moerge.coordinator import bulk_transfer
from moerge.coordinator.config import CoordinatorConfig
from moerge.expert_format import ADAPTER_WEIGHTS
from moerge.v1 import admin_pb2, admin_pb2_grpc, contributor_pb2, contributor_pb2_grpc
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator, bearer
from tests.coordinator.snapshot import snapshot
from tests.coordinator.test_server import _self_signed, enroll
from tests.coordinator.test_uploads import CuttingProxy, _nan
from tests.experts import make_expert_dir

OK = 0
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


@pytest.fixture(scope="module")
def expert_template(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    # rank 64: a few hundred KiB, so that a cut lands in the middle of the adapter weights
    return make_expert_dir(tiny_bert, tmp_path_factory.mktemp("experts") / "template", rank=64)


@pytest.fixture
def expert(tmp_path: Path, expert_template: Path) -> Path:
    target = tmp_path / "expert"
    shutil.copytree(expert_template, target)
    return target


@pytest.fixture
def coordinator(tmp_path: Path, tiny_bert: Path) -> Iterator[BackgroundCoordinator]:
    config = coordinator_config(tmp_path / "data", tiny_bert, bulk_max_connections=2)
    with BackgroundCoordinator(config) as running:
        yield running


def _target(coordinator: BackgroundCoordinator, name: str = "alice") -> Target:
    _, credential = enroll(coordinator.address, coordinator.admin_token(), name)
    return Target(address=coordinator.address, token=credential)


def _bulk(coordinator: BackgroundCoordinator) -> bulk_transfer.BulkServer:
    assert coordinator.running is not None and coordinator.running.bulk is not None
    return coordinator.running.bulk


def _ticket(
    coordinator: BackgroundCoordinator, target: Target, manifest: contributor_pb2.UploadManifest
) -> contributor_pb2.BulkUploadTicket:
    with grpc.insecure_channel(coordinator.address) as ch:
        return contributor_pb2_grpc.ContributorServiceStub(ch).StartBulkUpload(
            manifest, metadata=target.metadata(), timeout=30
        )


def _exchange(port: int, request: Request, payload: bytes = b"") -> list[Reply]:
    """Send a request header (and ``payload`` if told to go); return the replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        go = read_reply(sock.recv_into)
        if go.code != OK:
            return [go]
        sock.sendall(payload)
        return [go, read_reply(sock.recv_into)]


def _held(coordinator: BackgroundCoordinator, target: Target, upload_id: str) -> int:
    contributor = coordinator.state.registry.authenticate(target.token).contributor_id
    return coordinator.state.uploads.status(contributor, upload_id).received_bytes


def _payload(expert: Path) -> bytes:
    return b"".join(f.path.read_bytes() for f in describe_files(expert))


def test_upload_goes_over_the_data_channel_and_reupload_is_idempotent(
    coordinator: BackgroundCoordinator, expert: Path
) -> None:
    target = _target(coordinator)
    total = sum(f.size for f in describe_files(expert))
    grpc_proxy = CuttingProxy(coordinator.address, cut_after=None)
    try:
        via_proxy = Target(address=grpc_proxy.address, token=target.token)
        first = upload_expert(via_proxy, expert, "sentiment", "toy", progress=False)
        again = upload_expert(via_proxy, expert, "sentiment", "toy", progress=False)
    finally:
        grpc_proxy.close()
    assert first.created and first.expert.version == 1
    assert not again.created and again.expert.expert_id == first.expert.expert_id
    assert len(grpc_proxy.client_bytes) < total // 4  # the files did not travel over gRPC
    for f in first.expert.files:
        assert coordinator.state.blobs.verify(f.sha256)
    actions = [a.action for a in coordinator.state.registry.list_audit(page_size=100).items]
    assert "upload.begin" in actions and "upload.commit" in actions


def test_bulk_upload_resumes_from_the_coordinators_offset_after_a_cut(
    coordinator: BackgroundCoordinator, expert: Path
) -> None:
    target = _target(coordinator)
    total = sum(f.size for f in describe_files(expert))
    bulk = _bulk(coordinator)
    proxy = CuttingProxy(f"127.0.0.1:{bulk.port}", cut_after=total // 2)
    bulk.advertised_host, bulk.advertised_port = "127.0.0.1", int(proxy.address.rsplit(":")[1])
    try:
        response = upload_expert(target, expert, "resumed", "toy", progress=False)
    finally:
        proxy.close()
    assert proxy.cuts == 1 and response.created
    # the second connection sent only what the coordinator lacked (plus two short headers)
    assert total <= len(proxy.client_bytes) <= total + 512
    for f in response.expert.files:
        assert coordinator.state.blobs.verify(f.sha256)


def test_reused_expired_and_foreign_tickets_are_refused(
    coordinator: BackgroundCoordinator, expert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = _target(coordinator, "alice"), _target(coordinator, "bob")
    files = describe_files(expert)
    manifest = make_manifest(files, "mine", "toy", "")
    port = _bulk(coordinator).port
    first = _ticket(coordinator, alice, manifest)
    assert first.available and len(first.ticket) == 32 and first.status.received_bytes == 0
    head = _payload(expert)[:1000]
    go, done = _exchange(port, Request(first.ticket, manifest.upload_id, 0, 1000), head)
    assert (go.code, done.code, done.held) == (OK, OK, 1000)

    reused = _exchange(port, Request(first.ticket, manifest.upload_id, 1000, 10), head[:10])
    assert reused[0].code == UNAUTHENTICATED and "used or expired" in reused[0].message

    bobs = _ticket(coordinator, bob, make_manifest(files, "theirs", "toy", ""))
    foreign = _exchange(port, Request(bobs.ticket, manifest.upload_id, 1000, 10), head[:10])
    assert foreign[0].code == PERMISSION_DENIED

    stale = _ticket(coordinator, alice, manifest)
    later = time.monotonic() + bulk_transfer.TICKET_SECONDS + 1
    monkeypatch.setattr(bulk_transfer, "now", lambda: later)
    expired = _exchange(port, Request(stale.ticket, manifest.upload_id, 1000, 10), head[:10])
    assert expired[0].code == UNAUTHENTICATED
    forged = _exchange(port, Request(b"\0" * 32, manifest.upload_id, 1000, 10), head[:10])
    assert forged[0].code == UNAUTHENTICATED
    assert _held(coordinator, alice, manifest.upload_id) == 1000  # no refused byte was staged


def test_more_bytes_than_the_manifest_declares_are_never_staged(
    coordinator: BackgroundCoordinator, expert: Path
) -> None:
    target = _target(coordinator)
    files = describe_files(expert)
    manifest = make_manifest(files, "exact", "toy", "")
    total, payload, port = sum(f.size for f in files), _payload(expert), _bulk(coordinator).port

    ticket = _ticket(coordinator, target, manifest)
    (over,) = _exchange(port, Request(ticket.ticket, manifest.upload_id, 0, total + 1))
    assert over.code == INVALID_ARGUMENT and "overruns" in over.message
    assert _held(coordinator, target, manifest.upload_id) == 0

    ticket = _ticket(coordinator, target, manifest)
    _, done = _exchange(
        port, Request(ticket.ticket, manifest.upload_id, 0, total), payload + b"x" * 4096
    )
    assert done.code == OK and done.held == total  # the trailing bytes were never read
    staged = coordinator.state.uploads._folder(
        coordinator.state.registry.authenticate(target.token).contributor_id, manifest.upload_id
    )
    assert {p.name: p.stat().st_size for p in staged.iterdir()} == {f.name: f.size for f in files}
    # the manifest-only UploadExpert commits what the data channel staged
    assert upload_expert(target, expert, "exact", "toy", progress=False).created


@pytest.fixture
def impatient(tmp_path: Path, tiny_bert: Path) -> Iterator[BackgroundCoordinator]:
    """A coordinator with a short configured stall timeout and short-lived tickets."""
    config = coordinator_config(
        tmp_path / "data",
        tiny_bert,
        bulk_max_connections=2,
        bulk_stall_seconds=0.5,
        bulk_ticket_seconds=5.0,
    )
    with BackgroundCoordinator(config) as running:
        yield running


def test_configured_timeouts_drop_silent_connections_and_expire_tickets(
    impatient: BackgroundCoordinator, expert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator = impatient
    target = _target(coordinator)
    manifest = make_manifest(describe_files(expert), "slow", "toy", "")
    bulk = _bulk(coordinator)
    assert (bulk.stall_seconds, bulk.tickets.ttl_seconds) == (0.5, 5.0)
    others = [make_manifest(describe_files(expert), f"slow{i}", "toy", "") for i in (1, 2)]
    stalled = [socket.create_connection(("127.0.0.1", bulk.port)) for _ in range(2)]
    try:
        for sock, each in zip(stalled, [manifest, others[0]], strict=True):
            ticket = _ticket(coordinator, target, each)
            sock.sendall(Request(ticket.ticket, each.upload_id, 0, 100).encode())
            assert read_reply(sock.recv_into).code == OK  # then never send the bytes
        # both slots are taken (bulk_max_connections=2): a third verified connection is
        # turned away (an unverified one would hold no slot)
        ticket = _ticket(coordinator, target, others[1])
        (third,) = _exchange(bulk.port, Request(ticket.ticket, others[1].upload_id, 0, 100))
        assert third.code == RESOURCE_EXHAUSTED
        for sock in stalled:
            sock.settimeout(5)
            started = time.monotonic()
            assert sock.recv(1024) == b""  # closed by the coordinator, no reply
            assert time.monotonic() - started < 2
    finally:
        for sock in stalled:
            sock.close()
    assert _held(coordinator, target, manifest.upload_id) == 0

    # a ticket older than the configured 5 s is refused; a fresh one carries the upload
    stale = _ticket(coordinator, target, manifest)
    later = time.monotonic() + 5.5
    with monkeypatch.context() as patched:
        patched.setattr(bulk_transfer, "now", lambda: later)
        (expired,) = _exchange(bulk.port, Request(stale.ticket, manifest.upload_id, 0, 1))
    assert expired.code == UNAUTHENTICATED
    assert upload_expert(target, expert, "slow", "toy", progress=False).created


def test_chunks_are_used_when_the_data_channel_is_off_or_unreachable(
    tmp_path: Path, tiny_bert: Path, expert: Path
) -> None:
    total = sum(f.size for f in describe_files(expert))
    config = coordinator_config(tmp_path / "off", tiny_bert, bulk_listen="off")
    with BackgroundCoordinator(config) as off:
        assert off.running is not None and off.running.bulk is None
        target = _target(off)
        assert not _ticket(
            off, target, make_manifest(describe_files(expert), "x", "t", "")
        ).available
        proxy = CuttingProxy(off.address, cut_after=None)
        try:
            via_proxy = Target(address=proxy.address, token=target.token)
            assert upload_expert(via_proxy, expert, "chunks", "toy", progress=False).created
        finally:
            proxy.close()
        assert len(proxy.client_bytes) >= total  # the files went over gRPC
    config = coordinator_config(tmp_path / "on", tiny_bert)
    with BackgroundCoordinator(config) as on:
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            _bulk(on).advertised_port = probe.getsockname()[1]
        assert upload_expert(_target(on), expert, "fallback", "toy", progress=False).created


def test_data_channel_speaks_tls_when_the_coordinator_does(
    tmp_path: Path, tiny_bert: Path, expert: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    config = coordinator_config(tmp_path / "data", tiny_bert, tls_cert=str(cert), tls_key=str(key))
    with BackgroundCoordinator(config) as running:
        _, credential = enroll_tls(running, cert)
        target = Target(f"localhost:{running.running.port}", credential, str(cert))
        bulk = _bulk(running)
        with grpc.secure_channel(
            target.address, grpc.ssl_channel_credentials(cert.read_bytes())
        ) as ch:
            ticket = contributor_pb2_grpc.ContributorServiceStub(ch).StartBulkUpload(
                make_manifest(describe_files(expert), "tls", "toy", ""),
                metadata=target.metadata(),
            )
        assert ticket.available and ticket.tls
        with socket.create_connection(("127.0.0.1", bulk.port), timeout=10) as plain:
            plain.sendall(Request(ticket.ticket, "x" * 32, 0, 1).encode())
            try:
                answer = plain.recv(1024)
            except ConnectionResetError:
                answer = b""
            assert not answer.startswith(b"MOER")  # a TLS alert or a close, never a reply
        response = upload_expert(target, expert, "tls", "toy", progress=False)
        assert response.created


def enroll_tls(running: BackgroundCoordinator, cert: Path) -> tuple[str, str]:
    from moerge.v1 import admin_pb2, admin_pb2_grpc

    address = f"localhost:{running.running.port}"
    admin = (("authorization", f"Bearer {running.admin_token()}"),)
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(cert.read_bytes())) as ch:
        token = (
            admin_pb2_grpc.AdminServiceStub(ch)
            .CreateEnrollmentToken(admin_pb2.CreateEnrollmentTokenRequest(), metadata=admin)
            .token
        )
        joined = contributor_pb2_grpc.ContributorServiceStub(ch).Join(
            contributor_pb2.JoinRequest(enrollment_token=token, name="tls")
        )
    return joined.contributor_id, joined.credential


def test_a_refused_expert_sent_over_the_data_channel_leaves_nothing_behind(
    coordinator: BackgroundCoordinator, expert: Path
) -> None:
    target = _target(coordinator)
    _nan(expert / ADAPTER_WEIGHTS)
    before = snapshot(coordinator.state)
    with pytest.raises(grpc.RpcError) as err:
        upload_expert(target, expert, "bad", "toy", progress=False)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN" in err.value.details()
    assert snapshot(coordinator.state)["blobs"] == before["blobs"]
    assert coordinator.state.registry.list_experts().items == ()
    staged = [p for p in (Path(coordinator.config.data_dir) / "uploads").rglob("*") if p.is_file()]
    assert staged == []


def test_the_byte_quota_applies_to_the_data_channel_too(
    tmp_path: Path, tiny_bert: Path, expert: Path
) -> None:
    files = describe_files(expert)
    total = sum(f.size for f in files)
    config = coordinator_config(tmp_path / "data", tiny_bert, upload_bytes_per_hour=total * 3 // 2)
    with BackgroundCoordinator(config) as running:
        target = _target(running)
        assert upload_expert(target, expert, "first", "toy", progress=False).created
        manifest = make_manifest(files, "second", "toy", "")
        ticket = _ticket(running, target, manifest)
        replies = _exchange(
            _bulk(running).port,
            Request(ticket.ticket, manifest.upload_id, 0, total),
            _payload(expert),
        )
        assert replies[-1].code == RESOURCE_EXHAUSTED and "bytes per hour" in replies[-1].message
        assert _held(running, target, manifest.upload_id) == 0
        with pytest.raises(grpc.RpcError) as refused:  # and the client reports it as gRPC does
            upload_expert(target, expert, "second", "toy", progress=False)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry-after" in dict(refused.value.trailing_metadata())


@pytest.mark.parametrize("field", ["bulk_ticket_seconds", "bulk_stall_seconds"])
def test_data_channel_timeouts_must_be_positive(tiny_bert: Path, field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be > 0"):
        CoordinatorConfig.load(base_model=str(tiny_bert), **{field: "0"})
    assert (
        getattr(CoordinatorConfig.load(base_model=str(tiny_bert), **{field: "2.5"}), field) == 2.5
    )


@pytest.mark.parametrize("transport", ["auto", "bulk", "grpc"])
def test_transport_chooses_which_channel_carries_the_bytes(
    coordinator: BackgroundCoordinator, expert: Path, transport: str
) -> None:
    target = _target(coordinator)
    total = sum(f.size for f in describe_files(expert))
    bulk = _bulk(coordinator)
    grpc_proxy = CuttingProxy(coordinator.address, cut_after=None)
    data_proxy = CuttingProxy(f"127.0.0.1:{bulk.port}", cut_after=None)
    bulk.advertised_host, bulk.advertised_port = "127.0.0.1", int(data_proxy.address.split(":")[1])
    try:
        via_proxy = Target(address=grpc_proxy.address, token=target.token)
        response = upload_expert(via_proxy, expert, "x", "toy", progress=False, transport=transport)
    finally:
        grpc_proxy.close()
        data_proxy.close()
    assert response.created
    for f in response.expert.files:
        assert coordinator.state.blobs.verify(f.sha256)
    if transport == "grpc":
        assert len(data_proxy.client_bytes) == 0 and len(grpc_proxy.client_bytes) >= total
    else:
        assert len(data_proxy.client_bytes) >= total and len(grpc_proxy.client_bytes) < total // 4


def test_transport_bulk_fails_clearly_when_the_channel_is_off_or_unreachable(
    tmp_path: Path, tiny_bert: Path, expert: Path
) -> None:
    config = coordinator_config(tmp_path / "off", tiny_bert, bulk_listen="off")
    with BackgroundCoordinator(config) as off:
        target = _target(off)
        with pytest.raises(BulkUnavailable, match="does not offer the bulk data channel"):
            upload_expert(target, expert, "x", "toy", progress=False, transport="bulk")
        assert off.state.registry.list_experts().items == ()
        # grpc and auto still work against it (auto falls back to chunks)
        assert upload_expert(target, expert, "x", "toy", progress=False, transport="grpc").created
        again = upload_expert(target, expert, "x", "toy", progress=False, transport="auto")
        assert not again.created
    with BackgroundCoordinator(coordinator_config(tmp_path / "on", tiny_bert)) as on:
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            _bulk(on).advertised_port = probe.getsockname()[1]
        with pytest.raises(BulkUnavailable, match="cannot reach the data channel"):
            upload_expert(_target(on), expert, "y", "toy", progress=False, transport="bulk")


def test_upload_command_takes_the_transport_option(
    tmp_path: Path, tiny_bert: Path, expert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from moerge.cli import app

    monkeypatch.setenv("MOERGE_HOME", str(tmp_path / "home"))
    config = coordinator_config(tmp_path / "off", tiny_bert, bulk_listen="off")
    with BackgroundCoordinator(config) as off:
        target = _target(off)
        command = ["upload", str(expert), "-c", off.address, "--token", target.token, "--json"]
        refused = CliRunner().invoke(app, [*command, "--transport", "bulk"])
        assert refused.exit_code == 1
        message = " ".join(refused.output.split())
        assert "does not offer the bulk data channel" in message
        assert "use --transport auto or grpc" in message
        assert off.state.registry.list_experts().items == ()
        bogus = CliRunner().invoke(app, [*command, "--transport", "carrier-pigeon"])
        assert bogus.exit_code == 2
        sent = CliRunner().invoke(app, [*command, "--transport", "grpc"])
        assert sent.exit_code == 0, sent.output
        assert len(off.state.registry.list_experts().items) == 1


def test_silent_unverified_connections_take_no_upload_slot(
    impatient: BackgroundCoordinator, expert: Path
) -> None:
    """Pre-authentication slot exhaustion: idle sockets once filled bulk_max_connections."""
    coordinator = impatient
    target = _target(coordinator)
    manifest = make_manifest(describe_files(expert), "busy", "toy", "")
    bulk = _bulk(coordinator)
    idle = [socket.create_connection(("127.0.0.1", bulk.port)) for _ in range(6)]
    try:
        time.sleep(0.1)  # accepted, header pending
        payload = _payload(expert)
        ticket = _ticket(coordinator, target, manifest)
        go, done = _exchange(
            bulk.port, Request(ticket.ticket, manifest.upload_id, 0, len(payload)), payload
        )
        assert (go.code, done.code, done.held) == (OK, OK, len(payload))
    finally:
        for sock in idle:
            sock.close()


def test_the_request_header_has_an_absolute_deadline(
    impatient: BackgroundCoordinator, expert: Path
) -> None:
    """A byte every 0.3 s never tripped the 0.5 s per-read stall timeout."""
    coordinator = impatient
    target = _target(coordinator)
    manifest = make_manifest(describe_files(expert), "drip", "toy", "")
    header = Request(_ticket(coordinator, target, manifest).ticket, manifest.upload_id, 0, 1)
    with socket.create_connection(("127.0.0.1", _bulk(coordinator).port), timeout=5) as sock:
        started = time.monotonic()
        with pytest.raises(OSError):  # the cut shows on a send (or as the end of the stream)
            for byte in header.encode()[:-1]:
                sock.sendall(bytes([byte]))
                time.sleep(0.3)
            if sock.recv(1024) == b"":
                raise ConnectionResetError("closed")
        assert time.monotonic() - started < 3.0  # 0.5 s deadline, not 0.3 s x header bytes
    assert _held(coordinator, target, manifest.upload_id) == 0


def test_a_ticket_issued_before_revoking_the_contributor_writes_nothing(
    coordinator: BackgroundCoordinator, expert: Path
) -> None:
    target = _target(coordinator)
    manifest = make_manifest(describe_files(expert), "revoked", "toy", "")
    ticket = _ticket(coordinator, target, manifest)
    contributor_id = coordinator.state.registry.authenticate(target.token).contributor_id
    with grpc.insecure_channel(coordinator.address) as ch:
        admin_pb2_grpc.AdminServiceStub(ch).RevokeContributor(
            admin_pb2.RevokeContributorRequest(contributor_id=contributor_id, reason="test"),
            metadata=bearer(coordinator.admin_token()),
        )
    payload = _payload(expert)[:1000]
    replies = _exchange(
        _bulk(coordinator).port, Request(ticket.ticket, manifest.upload_id, 0, 1000), payload
    )
    assert replies[-1].code == PERMISSION_DENIED and "revoked" in replies[-1].message
    staged = coordinator.state.uploads._folder(contributor_id, manifest.upload_id)
    assert sum(p.stat().st_size for p in staged.iterdir()) == 0
