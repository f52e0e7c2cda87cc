"""Damaged expert uploads: every one refused with a proper status, nothing of it kept.

The same mutators (:mod:`tests.fuzz.files`) feed two paths: the plain upload handler
(``contributor_handler.UploadSession``, where a network adds nothing, so most cases go here)
and the real ``UploadExpert`` stream over loopback gRPC.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moerge.coordinator.rpc.contributor_handler import UploadSession
from moerge.coordinator.rpc.status import status_for
from moerge.refusals import NotFound
from moerge.v1 import contributor_pb2_grpc
from tests.fuzz import budget
from tests.fuzz.conftest import FuzzServer
from tests.fuzz.files import MUTATORS, Upload, load_valid, mutate
from tests.fuzz.oracle import (
    REFUSALS,
    Defect,
    check_alive,
    check_blobs_verify,
    only_upload_bookkeeping,
)


def send_to_handler(server: FuzzServer, upload: Upload) -> tuple[grpc.StatusCode, str] | None:
    """The servicer's own steps, without the network: receive each message, then finish."""
    session = UploadSession(server.state, server.principal)
    try:
        for message in upload.stream():
            session.receive(message)
        session.finish()
    except Exception as exc:  # the servicer maps exactly these with status_for
        return status_for(exc)
    return None


def send_over_grpc(server: FuzzServer, upload: Upload) -> tuple[grpc.StatusCode, str] | None:
    stub = contributor_pb2_grpc.ContributorServiceStub(server.channel)
    try:
        stub.UploadExpert(iter(upload.stream()), metadata=server.contributor, timeout=60)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return None


def check_upload(fuzzer: str, server: FuzzServer, upload: Upload, send) -> None:
    before = server.snapshot.before()
    refusal = send(server, upload)
    check_alive(server.channel)
    after = server.snapshot()
    case = upload.label
    staging = Path(server.state.config.staging_dir)
    if refusal is None:
        budget.record(budget.label(fuzzer, server.db), "accepted")
        check_blobs_verify(server.state)
        changes = before.changes(after)
        if changes.get("experts", ([], []))[1]:
            raise Defect(f"{case}: an accepted upload changed an existing expert: {changes}")
        added = changes.get("experts", ([], []))[0]
        digest = before.columns["experts"].index("content_sha256")
        known = {row[digest] for row in before.rows["experts"]}
        if added and added[0]["content_sha256"] in known:
            raise Defect(f"{case}: content already registered became a new expert: {added[0]}")
        if added and added[0]["name"] != upload.expert_name:
            raise Defect(f"{case}: name {upload.expert_name!r} stored as {added[0]['name']!r}")
        return
    code, message = refusal
    budget.record(budget.label(fuzzer, server.db), f"refused:{code.name}")
    if os.environ.get("MOERGE_FUZZ_VERBOSE"):
        print(f"{case} -> {code.name}: {message[:150]}")
    if code not in REFUSALS or not message.strip():
        raise Defect(f"{case}: status {code} ({message!r}) is not a proper refusal")
    if not only_upload_bookkeeping(before, after):
        raise Defect(f"{case}: a refused upload changed the store: {before.changes(after)}")
    upload_id = upload.manifest().upload_id
    try:
        state = server.state.registry.get_upload(server.contributor_id, upload_id).state
    except NotFound:
        return  # refused before it began
    if state == "failed":  # refused for good: its staged bytes must be gone
        left = [p for p in (staging / server.contributor_id).glob(f"{upload_id}.*")]
        if left:
            raise Defect(f"{case}: a refused upload left staging files {left}")


def _fuzz(fuzzer: str, server: FuzzServer, soak: bool, send) -> None:
    valid = load_valid(server.expert_dir)

    @settings(
        max_examples=budget.cases(fuzzer, soak, server.db),
        deadline=None,
        database=None,
        derandomize=not soak,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.sampled_from(sorted(MUTATORS)), st.randoms(use_true_random=False))
    def property_holds(name: str, rng: random.Random) -> None:
        check_upload(fuzzer, server, mutate(valid, rng, name if rng.random() < 0.8 else None), send)

    property_holds()


def test_damaged_uploads_are_refused_by_the_handler_and_leave_nothing(
    fuzz_server: FuzzServer, soak: bool
) -> None:
    _fuzz("upload_files", fuzz_server, soak, send_to_handler)


def test_damaged_uploads_are_refused_over_grpc_and_leave_nothing(
    fuzz_server: FuzzServer, soak: bool
) -> None:
    _fuzz("upload_grpc", fuzz_server, soak, send_over_grpc)
