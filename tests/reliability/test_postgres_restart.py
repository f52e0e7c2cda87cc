"""PostgreSQL restarted under load: requests fail fast with UNAVAILABLE, then work again.

A private cluster (not the session's shared one, which other tests use) serves a coordinator
process. Two clients call in a loop while the server is stopped for a few seconds and started
again: every call either succeeds or fails with UNAVAILABLE within its deadline (none hangs,
none is INTERNAL or UNKNOWN), and calls succeed again after the restart with the same
coordinator process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.v1 import admin_pb2, admin_pb2_grpc, contributor_pb2, contributor_pb2_grpc
from tests.postgres import PostgresCluster, find_postgres_bin
from tests.reliability.coordinator_process import CoordinatorProcess, bearer

pytestmark = pytest.mark.postgres

CALL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Call:
    started: float
    seconds: float
    code: grpc.StatusCode
    details: str


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _pg_ctl(cluster: PostgresCluster, *args: str) -> None:
    result = cluster._run("pg_ctl", "--pgdata", str(cluster.data_dir), *args)
    assert result.returncode == 0, result.stderr


def _options(cluster: PostgresCluster) -> str:
    return (
        f"-p {cluster.port} -c listen_addresses=127.0.0.1 "
        f"-c unix_socket_directories={cluster.root} -c fsync=off"
    )


def _hammer(rpc: object, stop: threading.Event, calls: list[Call]) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            rpc()  # type: ignore[operator]
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        calls.append(Call(started, time.monotonic() - started, code, details))
        time.sleep(0.02)


def test_requests_fail_cleanly_while_postgres_is_down_and_recover_after(
    tmp_path: Path, tiny_bert: Path, expert_pool: list[Path], own_cluster: PostgresCluster
) -> None:
    db_url = own_cluster.create_database("moerge")
    with CoordinatorProcess(tmp_path / "data", tiny_bert, db_url=db_url) as coordinator:
        token = coordinator.enroll("lab")
        upload_expert(
            Target(address=coordinator.address, token=token),
            expert_pool[0],
            "e",
            "t",
            progress=False,
        )
        channel = grpc.insecure_channel(coordinator.address)
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        contributor = contributor_pb2_grpc.ContributorServiceStub(channel)

        def list_experts() -> None:
            admin.ListExperts(
                admin_pb2.ListExpertsRequest(),
                metadata=bearer(coordinator.admin_token),
                timeout=CALL_TIMEOUT,
            )

        def list_mine() -> None:
            contributor.ListMyExperts(
                contributor_pb2.ListMyExpertsRequest(),
                metadata=bearer(token),
                timeout=CALL_TIMEOUT,
            )

        stop, calls = threading.Event(), []
        threads = [
            threading.Thread(target=_hammer, args=(rpc, stop, calls))
            for rpc in (list_experts, list_mine)
        ]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        _pg_ctl(own_cluster, "--mode", "fast", "--wait", "stop")
        down = time.monotonic()
        time.sleep(3.0)
        restarting = time.monotonic()  # it may accept connections before pg_ctl returns
        _pg_ctl(
            own_cluster,
            "--log",
            str(own_cluster.log_file),
            "--wait",
            "-o",
            _options(own_cluster),
            "start",
        )
        up = time.monotonic()
        time.sleep(3.0)
        stop.set()
        for thread in threads:
            thread.join(30)
        channel.close()
        assert coordinator.process is not None and coordinator.process.poll() is None

        while_down = [c for c in calls if c.started >= down and c.started + c.seconds <= restarting]
        assert while_down, "no call ran while PostgreSQL was down"
        assert {c.code for c in while_down} == {grpc.StatusCode.UNAVAILABLE}, [
            (round(c.started - down, 2), round(c.seconds, 2), c.code.name, c.details[:30])
            for c in while_down
            if c.code != grpc.StatusCode.UNAVAILABLE
        ]
        assert all("unavailable" in c.details for c in while_down)
        assert max(c.seconds for c in calls) < CALL_TIMEOUT  # nothing hung
        codes = {c.code for c in calls}
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        after = [c for c in calls if c.started > up + 1.0]
        assert after and all(c.code == grpc.StatusCode.OK for c in after)
