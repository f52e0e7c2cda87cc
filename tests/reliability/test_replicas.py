"""Two coordinator replicas as real processes over one PostgreSQL and one S3 API server.

Upload through one replica, predict through the other; the replica holding the leader lock
fits routers; an upload half done through it when it is SIGKILLed resumes through the other,
which takes the lock within seconds and fits the change; every replica serves the newest
active router. The S3 server is moto's
(tests/s3server.py says why not MinIO).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import pytest

from moerge.contributor_client.connection import Target
from moerge.contributor_client.object_upload import part_digests
from moerge.contributor_client.upload import describe_files, make_manifest, upload_expert
from moerge.v1 import admin_pb2, admin_pb2_grpc, contributor_pb2, contributor_pb2_grpc
from tests.reliability.coordinator_process import CoordinatorProcess, bearer, replica_pair
from tests.s3server import REGION, S3Server

T = TypeVar("T")
LEADER = "this replica is the leader"


def eventually(probe: Callable[[], T | None], seconds: float, what: str) -> T:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = probe()
        except grpc.RpcError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds} s: {what}")


def object_request(folder: Path) -> contributor_pb2.ObjectUploadRequest:
    """What ``upload_expert`` sends for ``folder`` (same upload id), for a hand-driven start."""
    files = describe_files(folder)
    manifest = make_manifest(files, folder.name, folder.name, "")
    return contributor_pb2.ObjectUploadRequest(
        manifest=manifest, files=part_digests(files, 16 << 20)
    )


def ready_versions(replica: CoordinatorProcess) -> list[admin_pb2.RouterVersion]:
    with grpc.insecure_channel(replica.address) as channel:
        listing = admin_pb2_grpc.AdminServiceStub(channel).ListRouterVersions(
            admin_pb2.ListRouterVersionsRequest(), metadata=bearer(replica.admin_token), timeout=30
        )
    return [v for v in listing.versions if v.status == "ready"]


@pytest.mark.postgres
def test_replicas_share_uploads_and_routers_and_a_new_leader_takes_over(
    tmp_path: Path,
    tiny_bert: Path,
    expert_pool: list[Path],
    fresh_postgres_url: str,
    s3_server: S3Server,
) -> None:
    settings = {
        "blob_store": f"s3://{s3_server.new_bucket()}/moerge",
        "s3_endpoint_url": s3_server.endpoint_url,
        "s3_region": REGION,
        "auto_retrain": "true",
        "retrain_debounce_seconds": 0.5,
        "router_poll_seconds": 0.5,
        "leader_check_seconds": 0.5,
    }
    replicas = replica_pair(tmp_path, tiny_bert, fresh_postgres_url, **settings)
    try:
        for replica in replicas:
            replica.start()
        first, second = replicas
        credential = first.enroll("alice")
        for folder in expert_pool[:2]:  # straight into the object store, through replica a
            response = upload_expert(
                Target(first.address, credential),
                folder,
                folder.name,
                folder.name,
                progress=False,
                transport="object",
            )
            assert response.created
        # whichever replica leads fits the router; replica b serves it
        served = eventually(lambda: second.predict().router_version, 60, "b predicts")
        assert served == eventually(lambda: first.predict().router_version, 10, "a predicts")
        leaders = [r for r in replicas if LEADER in r.log_text()]
        assert len(leaders) == 1, "exactly one replica leads"
        leader = leaders[0]
        survivor = second if leader is first else first

        # an upload begun through the leader: half its parts are in the store when it dies
        third = expert_pool[2]
        request = object_request(third)
        with grpc.insecure_channel(leader.address) as channel:
            plan = contributor_pb2_grpc.ContributorServiceStub(channel).StartObjectUpload(
                request, metadata=bearer(credential), timeout=30
            )
        for part in plan.parts[:2]:
            put = httpx.put(
                part.url,
                content=(third / part.file).read_bytes(),
                headers={"x-amz-checksum-sha256": part.checksum_sha256},
            )
            assert put.status_code == 200

        leader.kill()
        took_over = time.monotonic()
        eventually(lambda: LEADER in survivor.log_text(), 10, "the survivor takes the lock")
        failover = time.monotonic() - took_over
        # the client resumes through the survivor: the store says which parts arrived
        with grpc.insecure_channel(survivor.address) as channel:
            resumed = contributor_pb2_grpc.ContributorServiceStub(channel).StartObjectUpload(
                request, metadata=bearer(credential), timeout=30
            )
        assert [p.uploaded for p in resumed.parts] == [True, True, False, False]
        # the new leader fits the next expert change, completed through the survivor
        assert upload_expert(
            Target(survivor.address, credential), third, third.name, third.name, progress=False
        ).created
        newest = eventually(
            lambda: [v for v in ready_versions(survivor) if len(v.expert_ids) == 3],
            60,
            "a router over all three experts",
        )[0]
        eventually(
            lambda: survivor.predict().router_version == newest.version,
            10,
            "the survivor serves the new version",
        )
        print(f"failover: {failover:.1f} s")
        assert failover < 5
    finally:
        for replica in replicas:
            replica.kill()
