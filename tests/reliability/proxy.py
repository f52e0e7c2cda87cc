"""A loopback TCP proxy that slows and counts what the client sends.

Slowing the client's bytes keeps chosen uploads mid-stream for seconds, so a SIGKILL is sure to
catch them with bytes staged; counting them shows that a resumed upload sent only the rest.
The client under test is the real one; only the wire between it and the coordinator is ours.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from abc import ABC, abstractmethod


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


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()
