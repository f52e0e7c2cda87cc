"""Direct uploads into an S3 object store: presigned part URLs, resume, verification, refusal.

A real coordinator on 127.0.0.1:0 keeps its blobs in a real S3 API server (moto's, in its own
process; tests/s3server.py says why not MinIO) and the client PUTs the parts over HTTP.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from moerge.contributor_client.connection import Target
from moerge.contributor_client.object_upload import part_digests
from moerge.contributor_client.upload import (
    TransportUnavailable,
    describe_files,
    make_manifest,
    upload_expert,
)
from moerge.storage.blobstore_s3 import S3BlobStore
from moerge.v1 import contributor_pb2, contributor_pb2_grpc
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir, rewrite_json
from tests.s3server import REGION, S3Server

PART = 5 << 20


@pytest.fixture(scope="module")
def expert_template(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    return make_expert_dir(tiny_bert, tmp_path_factory.mktemp("experts") / "template")


@pytest.fixture
def expert(tmp_path: Path, expert_template: Path) -> Path:
    return Path(shutil.copytree(expert_template, tmp_path / "expert"))


@pytest.fixture
def s3_coordinator(
    tmp_path: Path, tiny_bert: Path, s3_server: S3Server
) -> Iterator[BackgroundCoordinator]:
    config = coordinator_config(
        tmp_path / "data",
        tiny_bert,
        blob_store=f"s3://{s3_server.new_bucket()}/moerge",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region=REGION,
        object_part_bytes=PART,
    )
    with BackgroundCoordinator(config) as running:
        yield running


def _target(coordinator: BackgroundCoordinator) -> Target:
    _, credential = enroll(coordinator.address, coordinator.admin_token(), "alice")
    return Target(address=coordinator.address, token=credential)


def _staged_keys(store: S3BlobStore) -> list[str]:
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix + "uploads/")
    return [item["Key"] for item in listing.get("Contents", ())]


def _request(expert: Path, name: str = "sentiment") -> contributor_pb2.ObjectUploadRequest:
    files = describe_files(expert)
    manifest = make_manifest(files, name, "toy", "")
    return contributor_pb2.ObjectUploadRequest(manifest=manifest, files=part_digests(files, PART))


def _put(part: contributor_pb2.UploadPart, data: bytes) -> httpx.Response:
    return httpx.put(
        part.url, content=data, headers={"x-amz-checksum-sha256": part.checksum_sha256}
    )


def test_an_expert_goes_straight_into_the_store_and_again_is_idempotent(
    s3_coordinator: BackgroundCoordinator, expert: Path
) -> None:
    target = _target(s3_coordinator)
    first = upload_expert(target, expert, "sentiment", "toy", progress=False, transport="object")
    assert first.created and first.expert.version == 1
    store = s3_coordinator.state.blobs
    assert isinstance(store, S3BlobStore)
    for f in first.expert.files:
        assert store.verify(f.sha256)
    assert _staged_keys(store) == []  # the staged objects were copied in and removed
    again = upload_expert(target, expert, "sentiment", "toy", progress=False)
    assert not again.created and again.expert.expert_id == first.expert.expert_id


def test_a_cut_upload_resumes_with_urls_for_the_missing_parts_only(
    s3_coordinator: BackgroundCoordinator, expert: Path
) -> None:
    target = _target(s3_coordinator)
    request = _request(expert)
    with grpc.insecure_channel(s3_coordinator.address) as ch:
        stub = contributor_pb2_grpc.ContributorServiceStub(ch)
        plan = stub.StartObjectUpload(request, metadata=target.metadata())
        assert plan.part_size == PART and len(plan.parts) == 4
        assert all(p.url and not p.uploaded for p in plan.parts)
        sent = plan.parts[:2]  # then the connection is cut
        for part in sent:
            assert _put(part, (expert / part.file).read_bytes()).status_code == 200
        with pytest.raises(grpc.RpcError) as refused:
            stub.CompleteObjectUpload(request, metadata=target.metadata())
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "have not arrived" in (refused.value.details() or "")
        # the status counts what the store holds (the parts never passed through a replica)
        status = stub.GetUploadStatus(
            contributor_pb2.GetUploadStatusRequest(upload_id=request.manifest.upload_id),
            metadata=target.metadata(),
        )
        assert status.state == "receiving"
        assert status.received_bytes == sum(p.size for p in sent) > 0
    # any client (or replica) asking again learns what arrived from the store itself
    resumed = upload_expert(target, expert, "sentiment", "toy", progress=False)
    assert resumed.created
    with grpc.insecure_channel(s3_coordinator.address) as ch:
        status = contributor_pb2_grpc.ContributorServiceStub(ch).GetUploadStatus(
            contributor_pb2.GetUploadStatusRequest(upload_id=request.manifest.upload_id),
            metadata=target.metadata(),
        )
    assert status.state == "committed"


def test_a_part_that_does_not_match_its_sha256_is_sent_again(
    s3_coordinator: BackgroundCoordinator, expert: Path
) -> None:
    target = _target(s3_coordinator)
    request = _request(expert)
    with grpc.insecure_channel(s3_coordinator.address) as ch:
        stub = contributor_pb2_grpc.ContributorServiceStub(ch)
        plan = stub.StartObjectUpload(request, metadata=target.metadata())
        for part in plan.parts:
            data = (expert / part.file).read_bytes()
            if part.file == "adapter_model.safetensors":
                data = data[:-1] + bytes([data[-1] ^ 1])  # moto does not check the checksum
            _put(part, data)
        with pytest.raises(grpc.RpcError) as refused:
            stub.CompleteObjectUpload(request, metadata=target.metadata())
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "part 1 does not match" in (refused.value.details() or "")
        again = stub.StartObjectUpload(request, metadata=target.metadata())
        missing = [p for p in again.parts if not p.uploaded]
        assert [p.file for p in missing] == ["adapter_model.safetensors"]
        _put(missing[0], (expert / missing[0].file).read_bytes())
        done = stub.CompleteObjectUpload(request, metadata=target.metadata())
    assert done.created


def test_an_invalid_expert_is_refused_from_the_store_and_leaves_nothing(
    s3_coordinator: BackgroundCoordinator, expert: Path
) -> None:
    rewrite_json(expert / "adapter_config.json", r=1000)  # above max_lora_rank
    target = _target(s3_coordinator)
    with pytest.raises(grpc.RpcError) as refused:
        upload_expert(target, expert, "sentiment", "toy", progress=False, transport="object")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    store = s3_coordinator.state.blobs
    assert isinstance(store, S3BlobStore)
    assert _staged_keys(store) == [] and list(store.iter_blobs()) == []
    assert not s3_coordinator.state.registry.list_experts().items


def test_without_an_object_store_direct_uploads_are_refused_with_a_reason(
    tmp_path: Path, tiny_bert: Path, expert: Path
) -> None:
    with BackgroundCoordinator(coordinator_config(tmp_path / "data", tiny_bert)) as running:
        target = _target(running)
        with pytest.raises(TransportUnavailable, match="no object store"):
            upload_expert(target, expert, "sentiment", "toy", progress=False, transport="object")
        with grpc.insecure_channel(running.address) as ch, pytest.raises(grpc.RpcError) as no:
            contributor_pb2_grpc.ContributorServiceStub(ch).StartObjectUpload(
                _request(expert), metadata=target.metadata()
            )
        assert no.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert upload_expert(target, expert, "sentiment", "toy", progress=False).created
