"""Per-contributor upload rate limits, through the real server: quotas, retry-after, resume."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc
import pytest

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import describe_files, make_manifest, upload_expert
from moerge.coordinator.interceptors import rate_limit
from moerge.coordinator.interceptors.rate_limit import TokenBucket
from moerge.v1 import contributor_pb2, contributor_pb2_grpc
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir

UPLOAD = "/moerge.v1.ContributorService/UploadExpert"


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("rate-experts")
    return [make_expert_dir(tiny_bert, root / f"e{i}", seed=i) for i in range(3)]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The limiter's clock, moved forward by adding to ``clock[0]`` (seconds)."""
    offset = [0.0]
    monkeypatch.setattr(rate_limit, "now", lambda: time.monotonic() + offset[0])
    return offset


def _serve(tmp_path: Path, tiny_bert: Path, **limits: int) -> BackgroundCoordinator:
    return BackgroundCoordinator(coordinator_config(tmp_path / "data", tiny_bert, **limits))


def _target(running: BackgroundCoordinator, name: str) -> Target:
    _, credential = enroll(running.address, running.admin_token(), name)
    return Target(address=running.address, token=credential)


def test_token_bucket_refuses_without_taking_and_paces_into_debt() -> None:
    bucket = TokenBucket.full(rate=10.0, capacity=100.0, at=0.0)
    assert bucket.take(60, at=0.0) == 0.0
    assert bucket.take(60, at=0.0) == pytest.approx(2.0)  # 20 missing at 10/s
    assert bucket.tokens == pytest.approx(40.0)  # a refusal takes nothing
    assert bucket.take(60, at=2.0) == 0.0
    assert bucket.take(1000, at=12.0) == 0.0  # above capacity: waits for a full bucket
    assert bucket.pace(50, at=12.0) == pytest.approx(5.0)  # 50 in debt at 10/s


def test_new_uploads_beyond_the_hourly_limit_are_refused_with_retry_after(
    tmp_path: Path, tiny_bert: Path, experts: list[Path], clock: list[float]
) -> None:
    with _serve(tmp_path, tiny_bert, uploads_per_hour=2) as running:
        alice, bob = _target(running, "alice"), _target(running, "bob")
        upload_expert(alice, experts[0], "e0", "toy", progress=False)
        upload_expert(alice, experts[1], "e1", "toy", progress=False)
        with pytest.raises(grpc.RpcError) as refused:
            upload_expert(alice, experts[2], "e2", "toy", progress=False)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry in" in refused.value.details()
        trailers = dict(refused.value.trailing_metadata())
        assert 1 <= int(trailers["retry-after"]) <= 1800  # one start refills in 30 minutes
        again = upload_expert(alice, experts[0], "e0", "toy", progress=False)
        assert not again.created  # an upload id already known is never counted
        assert upload_expert(bob, experts[2], "e2", "toy", progress=False).created
        assert running.running.metrics.requests(UPLOAD, "RESOURCE_EXHAUSTED") == 1
        clock[0] += int(trailers["retry-after"])
        assert upload_expert(alice, experts[2], "e2", "toy", progress=False).created


def test_an_upload_over_the_byte_quota_is_refused_mid_stream_and_resumes_later(
    tmp_path: Path, tiny_bert: Path, experts: list[Path], clock: list[float]
) -> None:
    files = describe_files(experts[0])
    total = sum(f.size for f in files)
    manifest = make_manifest(files, "big", "toy", "")
    stream = b"".join(f.path.read_bytes() for f in files)
    chunk, quota = 1024, total * 3 // 5
    assert total - quota + chunk <= quota, "the expert is too small for this test"
    with _serve(tmp_path, tiny_bert, upload_bytes_per_hour=quota) as running:
        alice = _target(running, "alice")
        messages = [contributor_pb2.UploadExpertRequest(manifest=manifest)] + [
            contributor_pb2.UploadExpertRequest(
                chunk=contributor_pb2.UploadChunk(offset=at, data=stream[at : at + chunk])
            )
            for at in range(0, total, chunk)
        ]
        with grpc.insecure_channel(running.address) as ch:
            stub = contributor_pb2_grpc.ContributorServiceStub(ch)
            with pytest.raises(grpc.RpcError) as refused:
                stub.UploadExpert(iter(messages), metadata=alice.metadata())
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "bytes per hour" in refused.value.details()
            status = stub.GetUploadStatus(
                contributor_pb2.GetUploadStatusRequest(upload_id=manifest.upload_id),
                metadata=alice.metadata(),
            )
        assert status.state == "receiving"
        assert quota - chunk < status.received_bytes <= quota
        assert running.state.registry.list_experts().items == ()
        clock[0] += 3600
        # The rest fits in one refilled hour only because the received prefix is kept.
        assert upload_expert(alice, experts[0], "big", "toy", progress=False).created


def test_a_paced_upload_is_slowed_not_refused(
    tmp_path: Path, tiny_bert: Path, experts: list[Path]
) -> None:
    folder = tmp_path / "expert"
    shutil.copytree(experts[1], folder)
    total = sum(f.size for f in describe_files(folder))
    rate = total // 3  # a one-second burst, then two seconds of debt for the rest
    with _serve(tmp_path, tiny_bert, upload_bytes_per_second=rate) as running:
        alice = _target(running, "alice")
        started = time.monotonic()
        assert upload_expert(alice, folder, "slow", "toy", progress=False).created
        elapsed = time.monotonic() - started
    assert elapsed >= (total - rate) / rate * 0.9
