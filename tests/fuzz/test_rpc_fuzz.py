"""Every RPC of the three services, fed hostile requests over real gRPC.

Two fuzzers share one server per module: a property-based one (hypothesis draws whole requests
from each message's descriptor) and a mutation one (valid seed requests with hostile field
values, or with their wire bytes damaged). Each case must pass :mod:`tests.fuzz.oracle`.
"""

from __future__ import annotations

import os
import random
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moerge.v1 import (
    admin_pb2,
    common_pb2,
    contributor_pb2,
    inference_pb2,
)
from tests.fuzz import budget
from tests.fuzz.conftest import FuzzServer
from tests.fuzz.messages import (
    RPCS,
    STUBS,
    Context,
    Rpc,
    mutate_bytes,
    mutate_fields,
    request_strategy,
)
from tests.fuzz.oracle import (
    Defect,
    check_alive,
    check_blobs_verify,
    check_refused,
    check_unchanged,
    only_upload_bookkeeping,
)

TIMEOUT = 60.0  # generous: the machine may be loaded; a hang still fails the case


def _metadata(server: FuzzServer, rpc: Rpc) -> tuple[tuple[str, str], ...]:
    return {"admin": server.admin, "contributor": server.contributor, "none": ()}[rpc.role]


def call(server: FuzzServer, rpc: Rpc, request: Any, raw: bool = False) -> grpc.RpcError | None:
    """Send one request (a message, a list for the upload stream, or raw bytes if ``raw``)."""
    metadata = _metadata(server, rpc)
    try:
        if raw:
            channel = server.channel
            if rpc.streaming:
                channel.stream_unary(rpc.path)(iter(request), metadata=metadata, timeout=TIMEOUT)
            else:
                channel.unary_unary(rpc.path)(request, metadata=metadata, timeout=TIMEOUT)
        else:
            method = getattr(STUBS[rpc.service](server.channel), rpc.method)
            payload = iter(request) if rpc.streaming else request
            method(payload, metadata=metadata, timeout=TIMEOUT)
    except grpc.RpcError as error:
        return error
    return None


def check_case(fuzzer: str, server: FuzzServer, rpc: Rpc, request: Any, raw: bool = False) -> None:
    """Run one case through the oracle; an accepted mutating call re-baselines nothing broken."""
    before = server.snapshot.before()
    error = call(server, rpc, request, raw)
    check_alive(server.channel)
    after = server.snapshot()
    case = (rpc.method, request)
    if error is not None:
        code = check_refused(error, case)
        if not (rpc.streaming and only_upload_bookkeeping(before, after)):
            check_unchanged(before, after, case)
        budget.record(budget.label(fuzzer, server.db), f"{rpc.method} refused:{code.name}")
        return
    budget.record(budget.label(fuzzer, server.db), f"{rpc.method} accepted")
    if not rpc.mutates:
        check_unchanged(before, after, case)
        return
    check_blobs_verify(server.state)
    _restore_seed_expert(server)


def _restore_seed_expert(server: FuzzServer) -> None:
    """Keep the seed expert active so that later cases still reach the inference code."""
    registry = server.state.registry
    if registry.get_expert(server.expert_id).state != "active":
        registry.set_expert_state("admin:fuzz", server.expert_id, "active", "fuzz reset")
        server.snapshot()  # the next case starts from here


def _context(server: FuzzServer) -> Context:
    return Context(expert_id=server.expert_id, contributor_id=server.contributor_id)


def test_every_rpc_refuses_generated_requests_cleanly(fuzz_server: FuzzServer, soak: bool) -> None:
    ctx = _context(fuzz_server)
    cases = st.sampled_from(RPCS).flatmap(
        lambda rpc: request_strategy(rpc, ctx).map(lambda request: (rpc, request))
    )

    @settings(
        max_examples=budget.cases("rpc_property", soak, fuzz_server.db),
        deadline=None,
        database=None,
        derandomize=not soak,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases)
    def property_holds(case: tuple[Rpc, Any]) -> None:
        check_case("rpc_property", fuzz_server, *case)

    property_holds()


def seeds(server: FuzzServer) -> dict[str, Any]:
    """One valid (or nearly valid) request per RPC, for the mutator to damage."""
    manifest = contributor_pb2.UploadManifest(
        upload_id="fuzz-seed-0001",
        expert_name="mutant",
        task_name="toy",
        task_description="a seed",
        files=[
            contributor_pb2.UploadFile(name=n, size=4, sha256="0" * 64)
            for n in (
                "adapter_config.json",
                "adapter_model.safetensors",
                "statistics.safetensors",
                "statistics.json",
            )
        ],
    )
    upload = [
        contributor_pb2.UploadExpertRequest(manifest=manifest),
        contributor_pb2.UploadExpertRequest(chunk=contributor_pb2.UploadChunk(data=b"abcd")),
    ]
    return {
        "Join": contributor_pb2.JoinRequest(enrollment_token="mge_x_y", name="newcomer"),
        "GetBaseModel": contributor_pb2.GetBaseModelRequest(),
        "UploadExpert": upload,
        "GetUploadStatus": contributor_pb2.GetUploadStatusRequest(upload_id="fuzz-seed-0001"),
        "ListMyExperts": contributor_pb2.ListMyExpertsRequest(),
        "RegisterNodeKey": contributor_pb2.RegisterNodeKeyRequest(public_key=_node_key()),
        "StartObjectUpload": contributor_pb2.ObjectUploadRequest(manifest=manifest),
        "CompleteObjectUpload": contributor_pb2.ObjectUploadRequest(manifest=manifest),
        "Predict": inference_pb2.PredictRequest(
            inputs=["good film"], top_k=1, expert_ids=[server.expert_id]
        ),
        "Route": inference_pb2.RouteRequest(inputs=["good film"], routing_method="centroid"),
        "ListExperts": admin_pb2.ListExpertsRequest(page_size=10),
        "GetExpert": admin_pb2.GetExpertRequest(expert_id=server.expert_id),
        "SetExpertState": admin_pb2.SetExpertStateRequest(
            expert_id=server.expert_id, state=common_pb2.EXPERT_STATE_ACTIVE, reason="ok"
        ),
        "DeleteExpert": admin_pb2.DeleteExpertRequest(expert_id="0" * 32),
        "ListRouterVersions": admin_pb2.ListRouterVersionsRequest(method="centroid"),
        "TrainRouter": admin_pb2.TrainRouterRequest(method="bogus", params_json="{}"),
        "ActivateRouterVersion": admin_pb2.ActivateRouterVersionRequest(version=1),
        "CreateEnrollmentToken": admin_pb2.CreateEnrollmentTokenRequest(
            note="n", ttl_seconds=-1, max_uses=1
        ),
        "ListContributors": admin_pb2.ListContributorsRequest(page_size=5),
        "RevokeContributor": admin_pb2.RevokeContributorRequest(contributor_id="0" * 32),
        "ListAuditLog": admin_pb2.ListAuditLogRequest(page_size=5, action="upload.begin"),
    }


def mutant(rpc: Rpc, seed: Any, rng: random.Random) -> tuple[Any, bool]:
    """A damaged copy of ``seed``: hostile field values (2/3) or damaged wire bytes (1/3)."""
    raw = rng.random() < 1 / 3
    changes = rng.choice([1, 1, 2, 3])
    if rpc.streaming:
        messages = [mutate_fields(m, rng, changes) if rng.random() < 0.7 else m for m in seed]
        if rng.random() < 0.2:
            messages = messages[::-1] if rng.random() < 0.5 else messages[:1] * 2
        if raw:
            return [mutate_bytes(m.SerializeToString(), rng) for m in messages], True
        return messages, False
    if raw:
        return mutate_bytes(seed.SerializeToString(), rng), True
    return mutate_fields(seed, rng, changes), False


def test_every_rpc_refuses_mutated_requests_cleanly(fuzz_server: FuzzServer, soak: bool) -> None:
    seed = int(os.environ.get("MOERGE_FUZZ_SEED", random.randrange(2**32) if soak else 8))
    rng = random.Random(seed)
    valid = seeds(fuzz_server)
    by_name = {rpc.method: rpc for rpc in RPCS}
    for index in range(budget.cases("rpc_mutation", soak, fuzz_server.db)):
        rpc = by_name[rng.choice(sorted(by_name))]
        request, raw = mutant(rpc, valid[rpc.method], rng)
        try:
            check_case("rpc_mutation", fuzz_server, rpc, request, raw)
        except Defect as defect:
            raise Defect(f"case {index} of MOERGE_FUZZ_SEED={seed}: {defect}") from None


def _node_key() -> str:
    """A valid SuperNode public key (OpenSSH ECDSA P-384) for the RegisterNodeKey seed."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    openssh = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    return key.public_bytes(*openssh).decode()
