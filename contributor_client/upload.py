"""Upload an expert folder over the client-streaming ``UploadExpert`` RPC, resuming on failure.

The upload id is derived from the manifest (expert name + every file's name, size and sha256),
so re-running ``moerge upload`` after a crash or a cut connection asks the coordinator how many
bytes it holds (``GetUploadStatus``) and continues from there; re-uploading identical content is
idempotent. Only the four files of :data:`moerge.expert_format.EXPERT_FILES` are ever read.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from moerge.contributor_client.connection import Target
from moerge.expert_format import EXPERT_FILES
from moerge.v1 import contributor_pb2, contributor_pb2_grpc

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
    name: str
    path: Path
    size: int
    sha256: str


def describe_files(expert_dir: Path) -> list[LocalFile]:
    """The expert's four files with sizes and digests; refuses a folder that lacks one."""
    files = []
    buffer = bytearray(1 << 20)  # one reused buffer: no fresh memory per block
    view = memoryview(buffer)
    for name in EXPERT_FILES:
        path = Path(expert_dir) / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{expert_dir} lacks {name} (an expert folder holds {', '.join(EXPERT_FILES)})"
            )
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                digest.update(view[:count])
        files.append(LocalFile(name, path, path.stat().st_size, digest.hexdigest()))
    return files


def make_manifest(
    files: list[LocalFile], expert_name: str, task_name: str, task_description: str
) -> contributor_pb2.UploadManifest:
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


def upload_expert(
    target: Target,
    expert_dir: str | Path,
    expert_name: str,
    task_name: str,
    task_description: str = "",
    chunk_size: int = DEFAULT_CHUNK,
    max_attempts: int = 8,
    progress: bool = True,
) -> contributor_pb2.UploadExpertResponse:
    """Upload (or resume uploading) an expert; returns the registered expert."""
    files = describe_files(Path(expert_dir))
    manifest = make_manifest(files, expert_name, task_name, task_description)
    total = sum(f.size for f in files)
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    )
    with bar, target.channel() as channel:
        stub = contributor_pb2_grpc.ContributorServiceStub(channel)
        task = bar.add_task(f"upload {expert_name}", total=total)
        for attempt in range(1, max_attempts + 1):
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
