"""The coordinator over real gRPC on 127.0.0.1:0: auth, validation, health, reflection, TLS."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import describe_files, make_manifest, upload_expert
from moerge.coordinator.logs import JsonFormatter
from moerge.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    contributor_pb2,
    contributor_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator, bearer
from tests.coordinator.snapshot import snapshot
from tests.experts import make_expert_dir


def enroll(address: str, admin_token: str, name: str) -> tuple[str, str]:
    """Create an enrollment token as admin and join with it; return (contributor id, credential)."""
    with grpc.insecure_channel(address) as ch:
        token = (
            admin_pb2_grpc.AdminServiceStub(ch)
            .CreateEnrollmentToken(
                admin_pb2.CreateEnrollmentTokenRequest(note="test"), metadata=bearer(admin_token)
            )
            .token
        )
        joined = contributor_pb2_grpc.ContributorServiceStub(ch).Join(
            contributor_pb2.JoinRequest(enrollment_token=token, name=name)
        )
    return joined.contributor_id, joined.credential


def _manifest_only() -> contributor_pb2.UploadExpertRequest:
    return contributor_pb2.UploadExpertRequest(
        manifest=contributor_pb2.UploadManifest(upload_id="bad/id", expert_name="x", task_name="t")
    )


#: (stub class, method, request factory, streaming?)
RPCS: list[tuple[type, str, Callable[[], Any], bool]] = [
    (
        contributor_pb2_grpc.ContributorServiceStub,
        "GetBaseModel",
        contributor_pb2.GetBaseModelRequest,
        False,
    ),
    (
        contributor_pb2_grpc.ContributorServiceStub,
        "UploadExpert",
        lambda: iter([_manifest_only()]),
        True,
    ),
    (
        contributor_pb2_grpc.ContributorServiceStub,
        "GetUploadStatus",
        lambda: contributor_pb2.GetUploadStatusRequest(upload_id="unknown-upload"),
        False,
    ),
    (
        contributor_pb2_grpc.ContributorServiceStub,
        "ListMyExperts",
        contributor_pb2.ListMyExpertsRequest,
        False,
    ),
    (
        contributor_pb2_grpc.ContributorServiceStub,
        "RegisterNodeKey",
        lambda: contributor_pb2.RegisterNodeKeyRequest(public_key="not a key"),
        False,
    ),
    (
        contributor_pb2_grpc.ContributorServiceStub,
        "StartObjectUpload",
        lambda: contributor_pb2.ObjectUploadRequest(manifest=_manifest_only().manifest),
        False,
    ),
    (
        inference_pb2_grpc.InferenceServiceStub,
        "Predict",
        lambda: inference_pb2.PredictRequest(inputs=["hello"]),
        False,
    ),
    (
        inference_pb2_grpc.InferenceServiceStub,
        "Route",
        lambda: inference_pb2.RouteRequest(inputs=["hello"]),
        False,
    ),
    (admin_pb2_grpc.AdminServiceStub, "ListExperts", admin_pb2.ListExpertsRequest, False),
    (
        admin_pb2_grpc.AdminServiceStub,
        "GetExpert",
        lambda: admin_pb2.GetExpertRequest(expert_id="0" * 32),
        False,
    ),
    (
        admin_pb2_grpc.AdminServiceStub,
        "SetExpertState",
        lambda: admin_pb2.SetExpertStateRequest(
            expert_id="0" * 32, state=common_pb2.EXPERT_STATE_RETIRED
        ),
        False,
    ),
    (
        admin_pb2_grpc.AdminServiceStub,
        "DeleteExpert",
        lambda: admin_pb2.DeleteExpertRequest(expert_id="0" * 32),
        False,
    ),
    (
        admin_pb2_grpc.AdminServiceStub,
        "ListRouterVersions",
        admin_pb2.ListRouterVersionsRequest,
        False,
    ),
    (
        admin_pb2_grpc.AdminServiceStub,
        "TrainRouter",
        lambda: admin_pb2.TrainRouterRequest(method="centroid"),
        False,
    ),
    (
        admin_pb2_grpc.AdminServiceStub,
        "ActivateRouterVersion",
        lambda: admin_pb2.ActivateRouterVersionRequest(version=99),
        False,
    ),
    (
        admin_pb2_grpc.AdminServiceStub,
        "CreateEnrollmentToken",
        admin_pb2.CreateEnrollmentTokenRequest,
        False,
    ),
    (admin_pb2_grpc.AdminServiceStub, "ListContributors", admin_pb2.ListContributorsRequest, False),
    (
        admin_pb2_grpc.AdminServiceStub,
        "RevokeContributor",
        lambda: admin_pb2.RevokeContributorRequest(contributor_id="0" * 32),
        False,
    ),
    (admin_pb2_grpc.AdminServiceStub, "ListAuditLog", admin_pb2.ListAuditLogRequest, False),
]

ALLOWED = {
    "ContributorServiceStub": {"contributor"},
    "InferenceServiceStub": {"contributor", "admin"},
    "AdminServiceStub": {"admin"},
}
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def _call(
    address: str, stub_cls: type, method: str, request: Any, metadata: tuple[tuple[str, str], ...]
) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as ch:
        try:
            getattr(stub_cls(ch), method)(request, metadata=metadata, timeout=60)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_every_rpc_admits_exactly_the_roles_it_should(coordinator: BackgroundCoordinator) -> None:
    admin = coordinator.admin_token()
    _, contributor = enroll(coordinator.address, admin, "alice")
    revoked_id, revoked = enroll(coordinator.address, admin, "mallory")
    with grpc.insecure_channel(coordinator.address) as ch:
        admin_pb2_grpc.AdminServiceStub(ch).RevokeContributor(
            admin_pb2.RevokeContributorRequest(contributor_id=revoked_id, reason="test"),
            metadata=bearer(admin),
        )
    callers = {
        "none": (),
        "garbage": bearer("not-a-token"),
        "revoked": bearer(revoked),
        "contributor": bearer(contributor),
        "admin": bearer(admin),
    }
    for stub_cls, method, request, _ in RPCS:
        for role, metadata in callers.items():
            code = _call(coordinator.address, stub_cls, method, request(), metadata)
            allowed = role in ALLOWED[stub_cls.__name__]
            if allowed:
                assert code not in DENIED, f"{method} as {role}: {code}"
            elif role in ("none", "garbage", "revoked"):
                assert code == grpc.StatusCode.UNAUTHENTICATED, f"{method} as {role}: {code}"
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, f"{method} as {role}: {code}"


def test_join_refuses_unknown_and_reused_enrollment_tokens(
    coordinator: BackgroundCoordinator,
) -> None:
    with grpc.insecure_channel(coordinator.address) as ch:
        stub = contributor_pb2_grpc.ContributorServiceStub(ch)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Join(contributor_pb2.JoinRequest(enrollment_token="mge_nope", name="bob"))
        assert bad.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = (
            admin_pb2_grpc.AdminServiceStub(ch)
            .CreateEnrollmentToken(
                admin_pb2.CreateEnrollmentTokenRequest(), metadata=bearer(coordinator.admin_token())
            )
            .token
        )
        stub.Join(contributor_pb2.JoinRequest(enrollment_token=token, name="bob"))
        with pytest.raises(grpc.RpcError) as reused:
            stub.Join(contributor_pb2.JoinRequest(enrollment_token=token, name="carol"))
        assert reused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _upload_request(**manifest: Any) -> list[contributor_pb2.UploadExpertRequest]:
    files = [
        contributor_pb2.UploadFile(name=n, size=1, sha256="a" * 64)
        for n in (
            "adapter_config.json",
            "adapter_model.safetensors",
            "statistics.safetensors",
            "statistics.json",
        )
    ]
    fields = {
        "upload_id": "upload-0001",
        "expert_name": "good",
        "task_name": "task",
        "files": files,
    }
    fields.update(manifest)
    return [contributor_pb2.UploadExpertRequest(manifest=contributor_pb2.UploadManifest(**fields))]


INVALID_UPLOADS = {
    "upload_id": _upload_request(upload_id="../../etc"),
    "expert_name": _upload_request(expert_name="a/b"),
    "expert_name_control": _upload_request(expert_name="bad\x07name"),
    "task_name": _upload_request(task_name="x" * 500),
    "files": _upload_request(
        files=[contributor_pb2.UploadFile(name="model.bin", size=1, sha256="a" * 64)]
    ),
    "sha256": _upload_request(
        files=[
            contributor_pb2.UploadFile(name=n, size=1, sha256="XYZ")
            for n in (
                "adapter_config.json",
                "adapter_model.safetensors",
                "statistics.safetensors",
                "statistics.json",
            )
        ]
    ),
}


def test_bad_input_is_invalid_argument_naming_the_field_and_changes_nothing(
    coordinator: BackgroundCoordinator,
) -> None:
    admin = coordinator.admin_token()
    _, credential = enroll(coordinator.address, admin, "alice")
    before = snapshot(coordinator.state)
    with grpc.insecure_channel(coordinator.address) as ch:
        contributor = contributor_pb2_grpc.ContributorServiceStub(ch)
        for field, messages in INVALID_UPLOADS.items():
            with pytest.raises(grpc.RpcError) as err:
                contributor.UploadExpert(iter(messages), metadata=bearer(credential))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert field.split("_control")[0] in err.value.details(), err.value.details()
        admin_stub = admin_pb2_grpc.AdminServiceStub(ch)
        cases = [
            ("state", admin_stub.ListExperts, admin_pb2.ListExpertsRequest(state=42)),
            (
                "state",
                admin_stub.SetExpertState,
                admin_pb2.SetExpertStateRequest(expert_id="0" * 32, state=42),
            ),
            (
                "state",
                admin_stub.SetExpertState,
                admin_pb2.SetExpertStateRequest(expert_id="0" * 32),
            ),
            (
                "reason",
                admin_stub.SetExpertState,
                admin_pb2.SetExpertStateRequest(
                    expert_id="0" * 32, state=common_pb2.EXPERT_STATE_RETIRED, reason="r" * 5000
                ),
            ),
            (
                "params_json",
                admin_stub.TrainRouter,
                admin_pb2.TrainRouterRequest(params_json="[1]"),
            ),
            (
                "ttl_seconds",
                admin_stub.CreateEnrollmentToken,
                admin_pb2.CreateEnrollmentTokenRequest(ttl_seconds=-5),
            ),
            ("page_token", admin_stub.ListExperts, admin_pb2.ListExpertsRequest(page_token="%%%")),
        ]
        for field, rpc, request in cases:
            with pytest.raises(grpc.RpcError) as err:
                rpc(request, metadata=bearer(admin))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value)
            assert field in err.value.details(), (field, err.value.details())
        with pytest.raises(grpc.RpcError) as err:
            contributor_pb2_grpc.ContributorServiceStub(ch).Join(
                contributor_pb2.JoinRequest(enrollment_token="x", name="evil\nname")
            )
        assert err.value.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.UNAUTHENTICATED,
        )
    after = snapshot(coordinator.state)
    assert after == before


def test_health_and_reflection_answer(coordinator: BackgroundCoordinator) -> None:
    with grpc.insecure_channel(coordinator.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "moerge.v1.AdminService", "moerge.v1.ContributorService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {
            "moerge.v1.AdminService",
            "moerge.v1.ContributorService",
            "moerge.v1.InferenceService",
            "grpc.health.v1.Health",
        } <= names


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` and ``127.0.0.1`` (tests/federated uses it
    for the coordinator's SuperLink too)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_round_trip_with_a_generated_certificate(tmp_path: Path, tiny_bert: Path) -> None:
    cert, key = _self_signed(tmp_path)
    config = coordinator_config(tmp_path / "data", tiny_bert, tls_cert=str(cert), tls_key=str(key))
    with BackgroundCoordinator(config) as running:
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        options = (("grpc.ssl_target_name_override", "localhost"),)
        address = f"localhost:{running.running.port}"
        with grpc.secure_channel(address, credentials, options=options) as ch:
            response = admin_pb2_grpc.AdminServiceStub(ch).ListExperts(
                admin_pb2.ListExpertsRequest(), metadata=bearer(config.admin_token), timeout=30
            )
            assert list(response.experts) == []
        with grpc.insecure_channel(address) as plain, pytest.raises(grpc.RpcError) as err:
            admin_pb2_grpc.AdminServiceStub(plain).ListExperts(
                admin_pb2.ListExpertsRequest(), metadata=bearer(config.admin_token), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_admin_token_is_minted_once_and_never_logged(
    tmp_path: Path,
    tiny_bert: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = coordinator_config(tmp_path / "data", tiny_bert)
    config.admin_token = ""
    with BackgroundCoordinator(config):
        pass
    printed = capsys.readouterr().out
    token_file = tmp_path / "data" / "admin-token"
    token = token_file.read_text().strip()
    assert token in printed
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert token not in caplog.text
    with BackgroundCoordinator(config) as again:
        assert token not in capsys.readouterr().out
        with grpc.insecure_channel(again.address) as ch:
            admin_pb2_grpc.AdminServiceStub(ch).ListExperts(
                admin_pb2.ListExpertsRequest(), metadata=bearer(token)
            )
    rows = again.state.registry.list_audit(page_size=1000).items
    assert all(token not in str(r.details) for r in rows)
    assert hashlib.sha256(token.encode()).hexdigest() not in printed


def test_a_contributor_cannot_reach_another_contributors_uploads_or_experts(
    coordinator: BackgroundCoordinator, tiny_bert: Path, tmp_path: Path
) -> None:
    """The "other contributor" row of the auth matrix: upload ids are per contributor, and a
    contributor's credential opens no admin RPC on anyone's expert."""
    admin = coordinator.admin_token()
    _, alice = enroll(coordinator.address, admin, "alice")
    _, bob = enroll(coordinator.address, admin, "bob")
    bobs_target = Target(address=coordinator.address, token=bob)
    bobs_expert = upload_expert(
        bobs_target,
        make_expert_dir(tiny_bert, tmp_path / "done", seed=1),
        "done",
        "t",
        progress=False,
    ).expert.expert_id
    files = describe_files(make_expert_dir(tiny_bert, tmp_path / "half", seed=2))
    manifest = make_manifest(files, "half", "t", "")
    first = files[0].path.read_bytes()
    half = [
        contributor_pb2.UploadExpertRequest(manifest=manifest),
        contributor_pb2.UploadExpertRequest(
            chunk=contributor_pb2.UploadChunk(offset=0, data=first)
        ),
    ]
    status_request = contributor_pb2.GetUploadStatusRequest(upload_id=manifest.upload_id)
    with grpc.insecure_channel(coordinator.address) as ch:
        contributor = contributor_pb2_grpc.ContributorServiceStub(ch)
        with pytest.raises(grpc.RpcError) as unfinished:
            contributor.UploadExpert(iter(half), metadata=bearer(bob))
        assert unfinished.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # "send the rest"
        before = contributor.GetUploadStatus(status_request, metadata=bearer(bob))
        assert before.received_bytes == len(first)

        with pytest.raises(grpc.RpcError) as hidden:
            contributor.GetUploadStatus(status_request, metadata=bearer(alice))
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        # Alice naming Bob's upload id gets an upload of her own, which holds none of his bytes.
        resume_bobs = [
            half[0],
            contributor_pb2.UploadExpertRequest(
                chunk=contributor_pb2.UploadChunk(offset=len(first), data=b"x" * 16)
            ),
        ]
        with pytest.raises(grpc.RpcError) as own:
            contributor.UploadExpert(iter(resume_bobs), metadata=bearer(alice))
        assert own.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "resume from 0" in own.value.details()
        assert contributor.GetUploadStatus(status_request, metadata=bearer(bob)) == before
        mine = contributor.ListMyExperts(
            contributor_pb2.ListMyExpertsRequest(), metadata=bearer(alice)
        )
        assert list(mine.experts) == []

        admin_stub = admin_pb2_grpc.AdminServiceStub(ch)
        on_bobs_expert = [
            (admin_stub.GetExpert, admin_pb2.GetExpertRequest(expert_id=bobs_expert)),
            (
                admin_stub.SetExpertState,
                admin_pb2.SetExpertStateRequest(
                    expert_id=bobs_expert, state=common_pb2.EXPERT_STATE_RETIRED
                ),
            ),
            (admin_stub.DeleteExpert, admin_pb2.DeleteExpertRequest(expert_id=bobs_expert)),
        ]
        for call, request in on_bobs_expert:
            with pytest.raises(grpc.RpcError) as denied:
                call(request, metadata=bearer(alice))
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert coordinator.state.registry.get_expert(bobs_expert).state == "active"


def test_no_secret_reaches_the_debug_json_log_in_a_join_upload_predict_flow(
    tmp_path: Path, tiny_bert: Path
) -> None:
    """Admin, enrollment and contributor tokens (and their hashes) never appear in the log."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with BackgroundCoordinator(
            coordinator_config(tmp_path / "data", tiny_bert, log_json=True)
        ) as running:
            admin = running.admin_token()
            with grpc.insecure_channel(running.address) as ch:
                enrollment = (
                    admin_pb2_grpc.AdminServiceStub(ch)
                    .CreateEnrollmentToken(
                        admin_pb2.CreateEnrollmentTokenRequest(), metadata=bearer(admin)
                    )
                    .token
                )
                credential = (
                    contributor_pb2_grpc.ContributorServiceStub(ch)
                    .Join(contributor_pb2.JoinRequest(enrollment_token=enrollment, name="alice"))
                    .credential
                )
                target = Target(address=running.address, token=credential)
                folder = make_expert_dir(tiny_bert, tmp_path / "e", seed=3)
                upload_expert(target, folder, "e", "t", progress=False)
                inference = inference_pb2_grpc.InferenceServiceStub(ch)
                inference.Predict(
                    inference_pb2.PredictRequest(inputs=["a fine film"]),
                    metadata=bearer(credential),
                )
                wrong = credential[:-4] + ("aaaa" if not credential.endswith("aaaa") else "bbbb")
                with pytest.raises(grpc.RpcError):
                    inference.Predict(
                        inference_pb2.PredictRequest(inputs=["x"]), metadata=bearer(wrong)
                    )
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
    text = stream.getvalue()
    assert "coordinator listening" in text  # the handler did see the coordinator's log
    assert all(json.loads(line) for line in text.splitlines() if line.strip())
    for token in (admin, enrollment, credential, wrong):
        secret = token.split("_", 2)[2]  # prefix_id_secret; the secret may contain "_"
        for leak in (token, secret, hashlib.sha256(secret.encode()).hexdigest()):
            assert leak not in text, f"a secret of a {token[:3]} token is in the log"
