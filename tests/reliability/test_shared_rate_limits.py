"""Rate limits hold across replicas: two coordinator processes over one PostgreSQL.

A caller that spreads its calls over both replicas is refused once the one shared budget is
spent, where buckets in each replica's memory would have let it spend the budget twice.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.v1 import inference_pb2, inference_pb2_grpc
from tests.reliability.coordinator_process import CoordinatorProcess, bearer, replica_pair

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def route(replica: CoordinatorProcess) -> grpc.StatusCode:
    """One Route call as admin: OK or why not (no router yet is fine: the call was counted)."""
    with grpc.insecure_channel(replica.address) as channel:
        try:
            inference_pb2_grpc.InferenceServiceStub(channel).Route(
                inference_pb2.RouteRequest(inputs=["the film was good"]),
                metadata=bearer(replica.admin_token),
                timeout=60,
            )
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.postgres
def test_a_callers_budget_split_across_two_replicas_is_refused_once_spent(
    tmp_path: Path, tiny_bert: Path, expert_pool: list[Path], fresh_postgres_url: str
) -> None:
    limits = {"inference_requests_per_minute": 4, "uploads_per_hour": 2}
    replicas = replica_pair(tmp_path, tiny_bert, fresh_postgres_url, **limits)
    try:
        for replica in replicas:
            replica.start()
        first, second = replicas
        # 4 per minute (one more every 15 s): two calls through each replica pass
        codes = [route(replicas[call % 2]) for call in range(4)]
        assert EXHAUSTED not in codes, codes
        refused = [route(first), route(second)]  # each replica's own bucket would hold 2 more
        assert refused == [EXHAUSTED, EXHAUSTED]

        credential = first.enroll("alice")  # 2 new uploads per hour, one through each
        for replica, folder in zip((first, second), expert_pool[:2], strict=True):
            target = Target(replica.address, credential)
            assert upload_expert(target, folder, folder.name, folder.name, progress=False).created
        third = expert_pool[2]
        with pytest.raises(grpc.RpcError) as over:
            upload_expert(
                Target(first.address, credential), third, third.name, third.name, progress=False
            )
        assert over.value.code() == EXHAUSTED
        assert 1 <= int(dict(over.value.trailing_metadata())["retry-after"]) <= 1800
    finally:
        for replica in replicas:
            replica.kill()
