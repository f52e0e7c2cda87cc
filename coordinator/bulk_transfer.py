"""The bulk data channel: upload bytes over plain TCP (or TLS) beside gRPC, for throughput.

gRPC stays the control plane: ``StartBulkUpload`` authenticates the contributor, opens (or
resumes) the upload through :class:`~moerge.coordinator.uploads.UploadReceiver` and hands out a
:class:`Tickets` ticket; the client then connects here, sends the request header of
:mod:`moerge.bulk_protocol` and the bytes, gets a reply, and commits with a manifest-only
``UploadExpert`` call. Staging, hashing, resume offsets, verification, validation and the
commit are the receiver's, shared with the gRPC chunk path.

A threaded server with blocking sockets: each connection ``recv_into``-s large reused buffers
(:meth:`UploadReceiver.receive`). Guards, as on the gRPC path: tickets are single use, bound to
one contributor's upload, and expire, and a revoked contributor's tickets write nothing; a
connection never stages more than the manifest declares. Before its ticket is verified a
connection holds no upload slot: it must deliver the TLS handshake and the request header
within ``stall_seconds`` *in all* (an absolute deadline, not per read), and at most
``max_unverified`` such connections wait at once. Only a verified connection counts against
``max_connections`` (beyond it: RESOURCE_EXHAUSTED, and the client falls back to gRPC chunks);
then each read times out after ``stall_seconds``; the upload rate limits apply per block.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from moerge.bulk_protocol import TICKET_BYTES, ProtocolError, Reply, Request, read_request
from moerge.coordinator.config import CoordinatorConfig
from moerge.coordinator.errors import DISK_FULL, status_for
from moerge.coordinator.rate_limit import UploadLimiter
from moerge.coordinator.uploads import UploadReceiver
from moerge.storage.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

# The defaults of the config fields bulk_ticket_seconds and bulk_stall_seconds:
TICKET_SECONDS = CoordinatorConfig.bulk_ticket_seconds  # a ticket is good this long after issue
STALL_SECONDS = CoordinatorConfig.bulk_stall_seconds  # a connection silent this long is dropped
MAX_TICKETS = 4096  # outstanding tickets kept; the oldest go first beyond this
BUSY = Reply(
    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
    0,
    "too many bulk data connections; try again or use UploadExpert chunks",
)


def now() -> float:
    """The tickets' clock (a module function, so that a test can move time forward)."""
    return time.monotonic()


@dataclass(frozen=True)
class Grant:
    contributor_id: str
    upload_id: str
    expires_at: float


class Tickets:
    """Single-use, short-lived bearer tickets for one upload of one contributor; thread-safe.

    Only a digest of each ticket is kept, so the table holds nothing a reader could replay.
    """

    def __init__(self, ttl_seconds: float = TICKET_SECONDS, max_tickets: int = MAX_TICKETS) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_tickets = max_tickets
        self._grants: dict[bytes, Grant] = {}  # insertion order = age
        self._lock = threading.Lock()

    def issue(self, contributor_id: str, upload_id: str) -> bytes:
        ticket = secrets.token_bytes(TICKET_BYTES)
        at = now()
        with self._lock:
            for key in [k for k, g in self._grants.items() if g.expires_at <= at]:
                del self._grants[key]
            while len(self._grants) >= self.max_tickets:
                del self._grants[next(iter(self._grants))]
            self._grants[_digest(ticket)] = Grant(contributor_id, upload_id, at + self.ttl_seconds)
        return ticket

    def check(self, ticket: bytes, upload_id: str) -> Grant:
        """What ``ticket`` grants, without consuming it (Unauthenticated/PermissionDenied)."""
        with self._lock:
            grant = self._grants.get(_digest(ticket))
        return _granted(grant, upload_id)

    def redeem(self, ticket: bytes, upload_id: str) -> Grant:
        """Consume ``ticket`` (whatever happens next) and return what it grants."""
        with self._lock:
            grant = self._grants.pop(_digest(ticket), None)
        return _granted(grant, upload_id)


def _granted(grant: Grant | None, upload_id: str) -> Grant:
    if grant is None or grant.expires_at <= now():
        raise Unauthenticated("unknown, already used or expired bulk upload ticket")
    if grant.upload_id != upload_id:
        raise PermissionDenied(f"the ticket is not for upload {upload_id!r}")
    return grant


def _digest(ticket: bytes) -> bytes:
    return hashlib.sha256(ticket).digest()


class BulkServer:
    """Listens on ``host:port`` and stages the bytes of ticketed uploads; thread per connection."""

    def __init__(
        self,
        uploads: UploadReceiver,
        host: str,
        port: int,
        *,
        limits: UploadLimiter | None = None,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 8,
        max_unverified: int = 0,
        stall_seconds: float = STALL_SECONDS,
        tickets: Tickets | None = None,
        advertised_host: str = "",
        advertised_port: int = 0,
    ) -> None:
        self.uploads = uploads
        self.limits = limits if limits is not None and limits.enabled else None
        self.tls = tls
        self.stall_seconds = stall_seconds
        self.tickets = tickets or Tickets()
        self._slots = threading.BoundedSemaphore(max_connections)
        # connections whose ticket is not verified yet: bounded apart, each for at most
        # stall_seconds in all, so that silent clients cannot take the slots of real uploads
        self._unverified = threading.BoundedSemaphore(max_unverified or 8 * max_connections)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=64)
        self.port = int(self._listener.getsockname()[1])
        self.advertised_host = advertised_host  # "" = the host clients reached gRPC on
        self.advertised_port = advertised_port or self.port
        self._open: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._guard = threading.Lock()
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept, name="moerge-bulk", daemon=True)

    def start(self) -> BulkServer:
        self._acceptor.start()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, cut the connections still open, wait for their threads."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(grace)
        with self._guard:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        for thread in threads:
            thread.join(grace)

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return
            if not self._unverified.acquire(blocking=False):
                threading.Thread(target=self._refuse_busy, args=(conn,), daemon=True).start()
                continue
            thread = threading.Thread(
                target=self._serve, args=(conn, peer), name="moerge-bulk-conn", daemon=True
            )
            with self._guard:
                self._open.add(conn)
                self._threads.add(thread)
            thread.start()

    def _refuse_busy(self, conn: socket.socket) -> None:
        """Too many data connections: say so (the client falls back to gRPC chunks)."""
        with conn:
            conn.settimeout(2.0)
            with contextlib.suppress(OSError):
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                conn.sendall(BUSY.encode())

    def _serve(self, raw: socket.socket, peer: object) -> None:
        """Header phase (unverified, under an absolute deadline), then the bytes (in a slot)."""
        conn, slot = raw, False
        deadline = threading.Timer(self.stall_seconds, _cut, (raw,))
        deadline.daemon = True
        try:
            try:
                raw.settimeout(self.stall_seconds)
                deadline.start()  # the TLS handshake and the header, all together
                if self.tls is not None:
                    conn = self.tls.wrap_socket(raw, server_side=True)
                verified = self._verify(conn)
            finally:
                deadline.cancel()
                self._unverified.release()
            if isinstance(verified, Reply):  # refused
                reply = verified
            else:
                slot = self._slots.acquire(blocking=False)
                reply = self._receive(conn, verified) if slot else BUSY
            conn.sendall(reply.encode())
        except OSError as exc:  # ssl.SSLError included
            log.info("bulk connection from %s ended: %s", peer, exc)
        finally:
            with self._guard:
                self._open.discard(raw)
                self._threads.discard(threading.current_thread())
            for s in (conn, raw):
                with contextlib.suppress(OSError):
                    s.close()
            if slot:
                self._slots.release()

    def _verify(self, conn: socket.socket) -> Request | Reply:
        """Read the request header and check its ticket (not yet consumed); a refusal is a
        reply. A cut or a stall raises OSError (nobody is left to read a reply)."""
        try:
            request = read_request(conn.recv_into)
            self.tickets.check(request.ticket, request.upload_id)
        except ProtocolError as exc:
            return Reply(grpc.StatusCode.INVALID_ARGUMENT.value[0], 0, str(exc))
        except (Unauthenticated, PermissionDenied) as exc:
            code, message = status_for(exc)
            return Reply(code.value[0], 0, message)
        return request

    def _receive(self, conn: socket.socket, request: Request) -> Reply:
        """Redeem the ticket and stage the bytes; turn every refusal into a reply."""
        try:
            grant = self.tickets.redeem(request.ticket, request.upload_id)
            # a ticket issued before RevokeContributor must not write afterwards
            if self.uploads.registry.get_contributor(grant.contributor_id).revoked_at:
                raise PermissionDenied(f"contributor {grant.contributor_id} has been revoked")
            held = self.uploads.receive(
                grant.contributor_id,
                grant.upload_id,
                request.offset,
                request.count,
                conn.recv_into,
                self._admit(grant.contributor_id),
                lambda: conn.sendall(Reply(0, request.offset, "send").encode()),
            )
        except OSError as exc:
            if _disk_full(exc):
                code, message = status_for(exc)
                return Reply(code.value[0], 0, message)
            raise  # a cut or a stall: nobody is left to read a reply
        except Exception as exc:
            code, message = status_for(exc)
            return Reply(code.value[0], 0, message)
        return Reply(0, held)

    def _admit(self, contributor_id: str) -> Callable[[int], None] | None:
        """The upload rate limits, per block: pace by sleeping, refuse beyond the quota."""
        limits = self.limits
        if limits is None:
            return None

        def admit(count: int) -> None:
            delay = limits.receive(contributor_id, count)
            if delay:
                time.sleep(delay)

        return admit


def _cut(conn: socket.socket) -> None:
    """The header deadline passed: end the connection (the serving thread sees an OSError)."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def open_bulk_channel(
    config: CoordinatorConfig, uploads: UploadReceiver, limits: UploadLimiter | None
) -> BulkServer | None:
    """Start the data channel that ``config`` asks for (``bulk_listen``), or None when off."""
    if config.bulk_listen == "off":
        return None
    if config.bulk_listen == "auto":  # listen's host, a free port (clients are told which)
        host, port = config.listen.rsplit(":", 1)[0], 0
    else:
        host, port_text = config.bulk_listen.rsplit(":", 1)
        port = int(port_text)
    advertised_host, advertised_port = config.bulk_advertise, 0
    if ":" in advertised_host and not advertised_host.endswith("]"):
        advertised_host, port_text = advertised_host.rsplit(":", 1)
        advertised_port = int(port_text)
    tls = None
    if config.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(config.tls_cert, config.tls_key)
    server = BulkServer(
        uploads,
        host.strip("[]"),
        port,
        limits=limits,
        tls=tls,
        max_connections=config.bulk_max_connections,
        stall_seconds=config.bulk_stall_seconds,
        tickets=Tickets(config.bulk_ticket_seconds),
        advertised_host=advertised_host,
        advertised_port=advertised_port,
    )
    log.info("bulk upload channel on %s:%d (tls=%s)", host, server.port, tls is not None)
    return server.start()
