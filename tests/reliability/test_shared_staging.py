"""A chunked upload cut by a replica's death resumes through another replica from the bytes
already staged, when the replicas share one staging folder (``upload_staging_dir``).

Two coordinator processes over one PostgreSQL; half of an expert's bytes go to replica a in a
stream that stays open, a is SIGKILLed, and replica b reports those bytes held and takes the
rest from there.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import describe_files, make_manifest, upload_expert
from moerge.v1 import contributor_pb2, contributor_pb2_grpc
from tests.reliability.coordinator_process import bearer, replica_pair

CHUNK = 4096


def staged_bytes(staging: Path) -> int:
    return sum(p.stat().st_size for p in staging.rglob("*.d/*") if p.is_file())


@pytest.mark.postgres
def test_a_chunked_upload_resumes_through_another_replica_from_the_staged_bytes(
    tmp_path: Path, tiny_bert: Path, expert_pool: list[Path], fresh_postgres_url: str
) -> None:
    staging = tmp_path / "staging"
    first, second = replica_pair(
        tmp_path, tiny_bert, fresh_postgres_url, upload_staging_dir=staging
    )
    try:
        first.start()
        second.start()
        credential = first.enroll("alice")
        folder = expert_pool[0]
        files = describe_files(folder)
        manifest = make_manifest(files, folder.name, folder.name, "")
        data = b"".join(f.path.read_bytes() for f in files)
        half = (len(data) // 2) // CHUNK * CHUNK
        cut = threading.Event()

        def half_then_hang() -> Iterator[contributor_pb2.UploadExpertRequest]:
            yield contributor_pb2.UploadExpertRequest(manifest=manifest)
            for offset in range(0, half, CHUNK):
                chunk = contributor_pb2.UploadChunk(
                    offset=offset, data=data[offset : offset + CHUNK]
                )
                yield contributor_pb2.UploadExpertRequest(chunk=chunk)
            cut.wait(60)  # the stream stays open until replica a dies

        def stream_to_first() -> None:
            with grpc.insecure_channel(first.address) as channel:
                stub = contributor_pb2_grpc.ContributorServiceStub(channel)
                with contextlib.suppress(grpc.RpcError):  # replica a is killed under it
                    stub.UploadExpert(half_then_hang(), metadata=bearer(credential), timeout=60)

        sender = threading.Thread(target=stream_to_first)
        sender.start()
        deadline = time.monotonic() + 30
        while staged_bytes(staging) < half:
            assert time.monotonic() < deadline, "replica a did not stage the first half"
            time.sleep(0.1)
        first.kill()
        cut.set()
        sender.join(30)

        with grpc.insecure_channel(second.address) as channel:
            status = contributor_pb2_grpc.ContributorServiceStub(channel).GetUploadStatus(
                contributor_pb2.GetUploadStatusRequest(upload_id=manifest.upload_id),
                metadata=bearer(credential),
                timeout=30,
            )
        assert status.received_bytes == half  # what a staged, not 0
        response = upload_expert(
            Target(second.address, credential),
            folder,
            folder.name,
            folder.name,
            progress=False,
            transport="grpc",
        )
        assert response.created
        assert not list(staging.rglob("*.d"))  # committed: the staged files are gone
    finally:
        first.kill()
        second.kill()
