"""Upload an expert folder to the coordinator, resuming on failure.

When the coordinator keeps its blobs in an object store (``BaseModelInfo.object_part_size`` >
0), the files go straight into the store through presigned part URLs
(:mod:`moerge.contributor_client.object_upload`); otherwise as chunks of the client-streaming
``UploadExpert`` RPC. Refusals arrive as the same gRPC status codes either way.

The upload id is derived from the manifest (expert name + every file's name, size and sha256),
so re-running ``moerge upload`` after a crash or a cut connection asks the coordinator how many
bytes it holds and continues from there; re-uploading identical content is idempotent. Only the
four files of :data:`moerge.expert_format.EXPERT_FILES` are ever read.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from moerge.contributor_client.connection import Target, client_home
from moerge.contributor_client.digests import DigestCache, sha256_file
from moerge.contributor_client.object_upload import part_digests, upload_via_object_store
from moerge.expert_format import EXPERT_FILES
from moerge.v1 import contributor_pb2, contributor_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024 * 1024  # 4 MiB measured slower in benchmarks/upload_throughput.py
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.ABORTED,
}


@dataclass(frozen=True)
class LocalFile:
    """One file of an expert folder as the upload manifest lists it: name, size and SHA-256."""

    name: str
    path: Path
    size: int
    sha256: str


def describe_files(expert_dir: Path, cache: DigestCache | None = None) -> list[LocalFile]:
    """The expert's four files with sizes and digests; refuses a folder that lacks one.

    With ``cache``, digests of files unchanged since they were last hashed are reused.
    """
    files = []
    for name in EXPERT_FILES:
        path = Path(expert_dir) / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{expert_dir} lacks {name} (an expert folder holds {', '.join(EXPERT_FILES)})"
            )
        digest = cache.sha256(path) if cache is not None else sha256_file(path)
        files.append(LocalFile(name, path, path.stat().st_size, digest))
    if cache is not None:
        try:
            cache.save()
        except OSError as exc:  # a read-only home must not stop an upload
            log.info("cannot save the sha256 cache: %s", exc)
    return files


def make_manifest(
    files: list[LocalFile], expert_name: str, task_name: str, task_description: str
) -> contributor_pb2.UploadManifest:
    """The upload manifest of an expert folder; its upload id is a digest of the names and file
    digests, so re-running an interrupted upload resumes it."""
    key = "\n".join([expert_name, task_name, *(f"{f.name}:{f.size}:{f.sha256}" for f in files)])
    upload_id = hashlib.sha256(key.encode()).hexdigest()[:32]
    return contributor_pb2.UploadManifest(
        upload_id=upload_id,
        expert_name=expert_name,
        task_name=task_name,
        task_description=task_description,
        files=[
            contributor_pb2.UploadFile(name=f.name, size=f.size, sha256=f.sha256) for f in files
        ],
    )


def _stream(
    manifest: contributor_pb2.UploadManifest,
    files: list[LocalFile],
    offset: int,
    chunk_size: int,
    on_bytes: Callable[[int], None],
) -> Iterator[contributor_pb2.UploadExpertRequest]:
    """The manifest, then the files back to back from ``offset``, in ``chunk_size`` chunks."""
    yield contributor_pb2.UploadExpertRequest(manifest=manifest)
    position = 0
    for f in files:
        if position + f.size <= offset:
            position += f.size
            continue
        with open(f.path, "rb") as handle:
            skip = max(0, offset - position)
            handle.seek(skip)
            position += skip
            while True:
                data = handle.read(chunk_size)
                if not data:
                    break
                yield contributor_pb2.UploadExpertRequest(
                    chunk=contributor_pb2.UploadChunk(offset=position, data=data)
                )
                position += len(data)
                on_bytes(len(data))


class TransportUnavailable(RuntimeError):
    """``transport="object"`` was asked for but the coordinator takes no direct uploads."""


TRANSPORTS = ("auto", "object", "grpc")


def upload_expert(
    target: Target,
    expert_dir: str | Path,
    expert_name: str,
    task_name: str,
    task_description: str = "",
    chunk_size: int = DEFAULT_CHUNK,
    max_attempts: int = 8,
    progress: bool = True,
    digest_cache: DigestCache | None = None,
    transport: str = "auto",
) -> contributor_pb2.UploadExpertResponse:
    """Upload (or resume uploading) an expert; returns the registered expert.

    ``transport``: ``"auto"`` PUTs the files into the coordinator's object store when it
    offers direct uploads, else sends gRPC chunks; ``"object"`` raises
    :class:`TransportUnavailable` when there is no object store; ``"grpc"`` sends chunks only.
    ``digest_cache``: where to remember the files' sha256 (default: the joined client's home,
    ``$MOERGE_HOME/sha256-cache.json``, if that folder exists).
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    cache = digest_cache if digest_cache is not None else DigestCache.in_home(client_home())
    files = describe_files(Path(expert_dir), cache)
    manifest = make_manifest(files, expert_name, task_name, task_description)
    total = sum(f.size for f in files)
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # stdout stays for results (``--json``)
        disable=not progress,
        transient=False,
    )
    with bar, target.channel() as channel:
        stub = contributor_pb2_grpc.ContributorServiceStub(channel)
        task = bar.add_task(f"upload {expert_name}", total=total)

        def advance(completed: int | None, count: int) -> None:
            if completed is not None:
                bar.update(task, completed=completed)
            bar.advance(task, count)

        part_size = 0
        if transport != "grpc":
            part_size = stub.GetBaseModel(
                contributor_pb2.GetBaseModelRequest(), metadata=target.metadata(), timeout=30
            ).object_part_size
            if not part_size and transport == "object":
                raise TransportUnavailable(
                    f"the coordinator at {target.address} takes no direct uploads (no object "
                    "store); use --transport auto or grpc"
                )
        if part_size:
            request = contributor_pb2.ObjectUploadRequest(
                manifest=manifest, files=part_digests(files, part_size)
            )
        for attempt in range(1, max_attempts + 1):
            if part_size:
                try:
                    return upload_via_object_store(stub, target, request, files, advance)
                except grpc.RpcError as exc:
                    details = exc.details() or ""
                    resumable = exc.code() in RETRYABLE or (
                        exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                        and ("have not arrived" in details or "send the file again" in details)
                    )
                    if not resumable or attempt == max_attempts:
                        raise
                except (OSError, httpx.HTTPError) as exc:  # a cut PUT, a refused part
                    if attempt == max_attempts:
                        raise
                    log.info("a part did not arrive (%s); resuming", exc)
                time.sleep(min(0.2 * 2**attempt, 5.0))
                continue
            offset = _held_bytes(stub, target, manifest.upload_id)
            bar.update(task, completed=offset)
            try:
                return stub.UploadExpert(
                    _stream(manifest, files, offset, chunk_size, lambda n: bar.advance(task, n)),
                    metadata=target.metadata(),
                    timeout=3600,
                )
            except grpc.RpcError as exc:
                resumable = exc.code() in RETRYABLE or (
                    exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                    and "resume from" in (exc.details() or "")
                )
                if not resumable or attempt == max_attempts:
                    raise
                time.sleep(min(0.2 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


def _held_bytes(
    stub: contributor_pb2_grpc.ContributorServiceStub, target: Target, upload_id: str
) -> int:
    """How many bytes the coordinator holds for this upload (0 if it has never seen it).

    A refused upload keeps its state and error at the coordinator: re-sending it answers with
    that error, which is what the caller should see.
    """
    try:
        status = stub.GetUploadStatus(
            contributor_pb2.GetUploadStatusRequest(upload_id=upload_id),
            metadata=target.metadata(),
            timeout=30,
        )
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return 0
        raise
    if status.state == "committed":
        return status.total_bytes  # send only the manifest: the response names the expert
    return status.received_bytes if status.state == "receiving" else 0
