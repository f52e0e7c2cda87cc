"""Direct uploads: PUT the expert's files into the coordinator's object store, part by part.

``StartObjectUpload`` answers with a presigned URL per part the store lacks, each signed with
the part's SHA-256; the client PUTs the parts (a few at a time, since one HTTP connection
seldom fills a fast link) with that digest in ``x-amz-checksum-sha256``, then calls
``CompleteObjectUpload``, which verifies and validates the files from the store before
anything is registered. A cut PUT, an expired URL or a replica that died is resumed by asking
again: the store says which parts arrived (docs/upload-protocol.md).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx

from moerge.contributor_client.connection import Target
from moerge.v1 import contributor_pb2, contributor_pb2_grpc

if TYPE_CHECKING:
    from moerge.contributor_client.upload import LocalFile

PARALLEL_PUTS = 4  # parts in flight at once
PUT_TIMEOUT = 120.0  # seconds a part's PUT may stall


class PartRefused(OSError):
    """The store refused a part (e.g. its checksum did not match): ask for new URLs."""


def part_digests(files: list[LocalFile], part_size: int) -> list[contributor_pb2.FileParts]:
    """The SHA-256 of every ``part_size`` slice of every file (one read of each file)."""
    result = []
    for f in files:
        digests = []
        with open(f.path, "rb") as handle:
            for _ in range(max(1, math.ceil(f.size / part_size))):
                digests.append(hashlib.sha256(handle.read(part_size)).hexdigest())
        result.append(contributor_pb2.FileParts(name=f.name, part_sha256=digests))
    return result


def _put(http: httpx.Client, path: str, part: contributor_pb2.UploadPart) -> int:
    with open(path, "rb") as handle:
        handle.seek(part.offset)
        data = handle.read(part.size)
    response = http.put(
        part.url,
        content=data,
        headers={
            "x-amz-checksum-sha256": part.checksum_sha256,
            "x-amz-sdk-checksum-algorithm": "SHA256",
        },
    )
    if response.status_code >= 300:
        raise PartRefused(
            f"part {part.part_number} of {part.file}: HTTP {response.status_code} "
            f"{response.text[:200]}"
        )
    return part.size


def upload_via_object_store(
    stub: contributor_pb2_grpc.ContributorServiceStub,
    target: Target,
    request: contributor_pb2.ObjectUploadRequest,
    files: list[LocalFile],
    on_progress: Callable[[int | None, int], None],
) -> contributor_pb2.UploadExpertResponse:
    """One attempt: plan, PUT the missing parts, complete. Errors propagate (the caller retries
    gRPC's and ``OSError``/``httpx`` ones by calling again, which resumes)."""
    plan = stub.StartObjectUpload(request, metadata=target.metadata(), timeout=60)
    on_progress(plan.status.received_bytes, 0)
    paths = {f.name: str(f.path) for f in files}
    todo = [part for part in plan.parts if not part.uploaded]
    if todo:
        with (
            httpx.Client(timeout=PUT_TIMEOUT) as http,
            ThreadPoolExecutor(PARALLEL_PUTS, thread_name_prefix="moerge-put") as pool,
        ):
            for sent in pool.map(lambda part: _put(http, paths[part.file], part), todo):
                on_progress(None, sent)
    return stub.CompleteObjectUpload(request, metadata=target.metadata(), timeout=3600)
