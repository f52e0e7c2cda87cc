"""A loopback TCP proxy that slows and counts what the client sends.

Slowing the client's bytes keeps chosen uploads mid-stream for seconds, so a SIGKILL is sure to
catch them with bytes staged; counting them shows that a resumed upload sent only the rest.
The client under test is the real one; only the wire between it and the coordinator is ours.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from abc import ABC, abstractmethod

from moerge.bulk_protocol import REQUEST, Request, read_exactly, read_request


class _LoopbackProxy(ABC):
    """Listens on 127.0.0.1:<port>; each client is connected to ``upstream`` and handed to
    :meth:`_serve` (a client that cannot be connected is closed)."""

    def __init__(self, upstream: tuple[str, int] | None) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.upstream is None:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            self._serve(client, server)

    @abstractmethod
    def _serve(self, client: socket.socket, server: socket.socket) -> None:
        """Take over both sockets (start the threads that forward between them)."""

    def close(self) -> None:
        self.listener.close()


class ThrottlingProxy(_LoopbackProxy):
    """Forward 127.0.0.1:<port> to ``upstream``; client bytes at most ``rate`` bytes/s."""

    def __init__(self, upstream: str, rate: float | None = None) -> None:
        host, port = upstream.rsplit(":", 1)
        self.rate = rate
        self.client_bytes = 0
        self._count = threading.Lock()
        super().__init__((host, int(port)))

    def _serve(self, client: socket.socket, server: socket.socket) -> None:
        threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
        threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        block = 1024 if from_client and self.rate else 65536
        try:
            while data := source.recv(block):
                sink.sendall(data)
                if from_client:
                    with self._count:
                        self.client_bytes += len(data)
                    if self.rate:
                        time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            _close(source, sink)

    def __enter__(self) -> ThrottlingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DataChannelProxy(_LoopbackProxy):
    """A proxy in front of the bulk data channel that reads each connection's request header.

    The coordinator advertises this proxy (``bulk_advertise``), so the real client streams
    through it. It records every request (offset, count, ticket) and the payload bytes it
    forwarded per connection, cuts the next connection after ``cut_after`` payload bytes (with a
    reset, once), and forwards the payload of the others at most ``rate`` bytes/s. ``upstream``
    may change between connections (a restarted coordinator listens on a new port).
    """

    def __init__(self) -> None:
        self.cut_after: int | None = None
        self.rate: float | None = None
        self.requests: list[Request] = []
        self.forwarded: list[int] = []  # payload bytes forwarded, per connection
        self._lock = threading.Lock()
        super().__init__(None)

    def point_at(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.upstream = (host, int(port))

    def _serve(self, client: socket.socket, server: socket.socket) -> None:
        cut_after, self.cut_after = self.cut_after, None
        threading.Thread(
            target=self._forward_request, args=(client, server, cut_after), daemon=True
        ).start()
        threading.Thread(target=_pipe, args=(server, client), daemon=True).start()

    def _forward_request(
        self, client: socket.socket, server: socket.socket, cut_after: int | None
    ) -> None:
        try:
            header = read_exactly(client.recv_into, REQUEST.size)
            name = read_exactly(client.recv_into, header[5])
            request = read_request(_Replay(header + name).recv_into)
            with self._lock:
                index = len(self.requests)
                self.requests.append(request)
                self.forwarded.append(0)
            server.sendall(header + name)
            block = 1024 if self.rate else 65536
            while data := client.recv(block):
                if cut_after is not None and self.forwarded[index] + len(data) > cut_after:
                    server.sendall(data[: cut_after - self.forwarded[index]])
                    self.forwarded[index] = cut_after
                    time.sleep(0.2)  # let the coordinator read it: a reset drops unread bytes
                    _reset(client, server)
                    return
                server.sendall(data)
                self.forwarded[index] += len(data)
                if self.rate:
                    time.sleep(len(data) / self.rate)
        except (OSError, ValueError):
            pass
        _close(client, server)


class _Replay:
    """``recv_into`` over bytes already read (to parse a header with the real parser)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def recv_into(self, view: memoryview) -> int:
        count = min(len(view), len(self.data))
        view[:count], self.data = self.data[:count], self.data[count:]
        return count


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    _close(source, sink)


def _reset(*sockets: socket.socket) -> None:
    """Close with RST, as a broken network does (not a clean FIN)."""
    for s in sockets:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RD)  # wake the other direction's recv
        s.close()


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()
