"""Upload an expert folder to the coordinator, resuming on failure.

The bytes go over the coordinator's bulk data channel when it offers one (``StartBulkUpload``
returns a ticket; the files are ``sendfile``-d over a plain TCP or TLS socket, see
:mod:`moerge.bulk_protocol`), else, or when that channel cannot be reached or refuses, as chunks
of the client-streaming ``UploadExpert`` RPC. Either way a manifest-only ``UploadExpert`` call
commits the expert, so refusals arrive as the same gRPC status codes.

The upload id is derived from the manifest (expert name + every file's name, size and sha256),
so re-running ``moerge upload`` after a crash or a cut connection asks the coordinator how many
bytes it holds and continues from there; re-uploading identical content is idempotent. Only the
four files of :data:`moerge.expert_format.EXPERT_FILES` are ever read.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
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

from moerge.bulk_protocol import ProtocolError, Reply, Request, read_reply
from moerge.contributor_client.connection import Target, client_home
from moerge.contributor_client.digests import DigestCache, sha256_file
from moerge.expert_format import EXPERT_FILES
from moerge.v1 import contributor_pb2, contributor_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024 * 1024  # 4 MiB measured slower in benchmarks/upload_throughput.py
SENDFILE_SLICE = 16 << 20  # bytes per sendfile call: the progress bar moves between calls
BULK_TIMEOUT = 60.0  # seconds a data-channel connect, send or reply may stall
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


class BulkRefused(Exception):
    """The data channel answered with an error (the gRPC path reports it properly)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        super().__init__(f"bulk upload refused ({grpc_code(reply.code).name}): {reply.message}")


class BulkUnreachable(OSError):
    """The data channel could not be connected to (firewall, NAT): use gRPC chunks."""


class BulkUnavailable(RuntimeError):
    """``transport="bulk"`` was asked for but the data channel cannot carry this upload."""


TRANSPORTS = ("auto", "bulk", "grpc")


def grpc_code(number: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)


def _host_of(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.removeprefix("dns:///").strip("[]")


def _connect(target: Target, ticket: contributor_pb2.BulkUploadTicket) -> socket.socket:
    """A connection to the data channel (TLS when it says so), or :class:`BulkUnreachable`."""
    host = ticket.host or _host_of(target.address)
    raw = None
    try:
        raw = socket.create_connection((host, ticket.port), timeout=BULK_TIMEOUT)
        if not ticket.tls:
            return raw
        context = ssl.create_default_context(cafile=target.tls_ca or None)
        return context.wrap_socket(raw, server_hostname=host)
    except OSError as exc:
        if raw is not None:
            raw.close()
        message = f"cannot reach the data channel at {host}:{ticket.port}: {exc}"
        raise BulkUnreachable(message) from exc


def send_bulk(
    target: Target,
    ticket: contributor_pb2.BulkUploadTicket,
    upload_id: str,
    files: list[LocalFile],
    on_bytes: Callable[[int], None],
) -> int:
    """Stream the bytes the coordinator lacks over its data channel; return the bytes it holds.

    Raises :class:`BulkUnreachable` if no connection opens, :class:`BulkRefused` on a refusal,
    and another ``OSError`` when the connection breaks midway (resume with a new ticket).
    """
    with _connect(target, ticket) as sock:
        offset = ticket.status.received_bytes
        count = ticket.status.total_bytes - offset
        sock.sendall(Request(ticket.ticket, upload_id, offset, count).encode())
        go = _read_reply(sock)
        if go.code:
            raise BulkRefused(go)
        try:
            _send_files(sock, files, offset, on_bytes)
        except OSError:
            # a refusal mid-stream (a quota, a full disk) closes the connection: its reply
            # may already be here, and says not to retry this channel
            refusal = _reply_if_any(sock)
            if refusal is not None and refusal.code:
                raise BulkRefused(refusal) from None
            raise
        done = _read_reply(sock)
        if done.code:
            raise BulkRefused(done)
        return done.held


def _send_files(
    sock: socket.socket, files: list[LocalFile], offset: int, on_bytes: Callable[[int], None]
) -> None:
    """The files back to back from stream offset ``offset``, zero-copy where possible."""
    position = 0
    for f in files:
        skip = max(0, offset - position)
        position += f.size
        if skip >= f.size:
            continue
        with open(f.path, "rb") as handle:
            while skip < f.size:
                sent = sock.sendfile(handle, skip, min(SENDFILE_SLICE, f.size - skip))
                if not sent:
                    raise ConnectionError(f"{f.path} shrank while it was being sent")
                skip += sent
                on_bytes(sent)


def _read_reply(sock: socket.socket) -> Reply:
    """The coordinator's reply; a connection that ends without one is a cut (resume)."""
    try:
        return read_reply(sock.recv_into)
    except ProtocolError as exc:  # closed early (a crash, a stall timeout) or garbled
        raise ConnectionError(f"the data channel ended without a reply: {exc}") from exc


def _reply_if_any(sock: socket.socket) -> Reply | None:
    try:
        sock.settimeout(1.0)
        return read_reply(sock.recv_into)
    except (OSError, ValueError):
        return None


def _try_bulk(
    stub: contributor_pb2_grpc.ContributorServiceStub,
    target: Target,
    manifest: contributor_pb2.UploadManifest,
    files: list[LocalFile],
    progress: Callable[[int | None, int], None],
) -> int | None:
    """Send the missing bytes over the data channel; the bytes held after, or None if it is off.

    gRPC errors of ``StartBulkUpload`` propagate.
    """
    ticket = stub.StartBulkUpload(manifest, metadata=target.metadata(), timeout=30)
    status = ticket.status
    if status.state == "committed":
        return status.total_bytes
    if status.state == "receiving" and status.received_bytes == status.total_bytes:
        return status.received_bytes  # every byte is staged: only the commit is left
    if not ticket.available:
        return None
    progress(status.received_bytes, 0)
    return send_bulk(target, ticket, manifest.upload_id, files, lambda n: progress(None, n))


def upload_expert(
    target: Target,
    expert_dir: str | Path,
    expert_name: str,
    task_name: str,
    task_description: str = "",
    chunk_size: int = DEFAULT_CHUNK,
    max_attempts: int = 8,
    progress: bool = True,
    bulk: bool = True,
    digest_cache: DigestCache | None = None,
    transport: str = "auto",
) -> contributor_pb2.UploadExpertResponse:
    """Upload (or resume uploading) an expert; returns the registered expert.

    ``transport``: ``"auto"`` sends the bytes over the coordinator's data channel when it
    offers one and falls back to gRPC chunks; ``"bulk"`` uses only the data channel and raises
    :class:`BulkUnavailable` when it cannot (off, unreachable, refusing); ``"grpc"`` sends
    chunks only. ``bulk=False`` is the same as ``transport="grpc"`` (kept for callers).
    ``digest_cache``: where to remember the files' sha256 (default: the joined client's home,
    ``$MOERGE_HOME/sha256-cache.json``, if that folder exists).
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    only_bulk = transport == "bulk"
    bulk = bulk and transport != "grpc"
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

        for attempt in range(1, max_attempts + 1):
            offset = None
            if bulk:
                try:
                    offset = _try_bulk(stub, target, manifest, files, advance)
                    bulk = offset is not None
                    if only_bulk and not bulk:
                        raise BulkUnavailable(
                            f"the coordinator at {target.address} does not offer the bulk data "
                            "channel (its bulk_listen is off); use --transport auto or grpc"
                        )
                except grpc.RpcError as exc:
                    # e.g. UNIMPLEMENTED (an older coordinator) or a refusal, which the chunk
                    # path below reports with UploadExpert's status code and trailers
                    if only_bulk and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                        raise BulkUnavailable(
                            f"the coordinator at {target.address} has no bulk data channel "
                            "(StartBulkUpload is unimplemented); use --transport auto or grpc"
                        ) from None
                    if only_bulk:
                        raise
                    log.info("StartBulkUpload failed (%s); sending gRPC chunks", exc.code())
                    bulk = False
                except (BulkUnreachable, BulkRefused) as exc:
                    if only_bulk:
                        raise BulkUnavailable(f"{exc}; use --transport auto or grpc") from None
                    log.info("%s; sending gRPC chunks instead", exc)
                    bulk = False  # the chunk path resumes, or reports the refusal properly
                except OSError as exc:  # cut midway: resume with a fresh ticket
                    if attempt < max_attempts:
                        log.info("data channel broke (%s); resuming", exc)
                        time.sleep(min(0.2 * 2**attempt, 5.0))
                        continue
                    if only_bulk:
                        raise BulkUnavailable(
                            f"the data channel broke {max_attempts} times (last: {exc})"
                        ) from None
                    bulk = False
            if offset is None:
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
