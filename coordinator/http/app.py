"""The FastAPI app, and uvicorn serving it as a task of the coordinator's own event loop.

Same loop as the gRPC server, so a route awaits the very handlers and batcher the servicers
do, without a thread or a network hop between the two APIs. The socket is bound here (port 0
picks a free one, as for gRPC) so that a busy port fails :func:`moerge.coordinator.server.start`
with an ``OSError`` instead of uvicorn's ``sys.exit``; uvicorn neither touches the signal
handlers (the coordinator owns SIGINT/SIGTERM) nor the logging configuration. With ``tls_cert``
set, HTTP is served over TLS with the same certificate, as gRPC is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from moerge import __version__
from moerge.coordinator.http import errors
from moerge.coordinator.http.api_router import router
from moerge.coordinator.interceptors.auth import AuthInterceptor
from moerge.coordinator.state import CoordinatorState

log = logging.getLogger(__name__)


def build_app(state: CoordinatorState, authenticator: AuthInterceptor) -> FastAPI:
    """The HTTP API over ``state``; ``authenticator`` is the gRPC server's (one token cache)."""
    app = FastAPI(
        title="moerge",
        version=__version__,
        summary="OpenAI-compatible routed completions, predictions and routing",
    )
    app.state.coordinator = state
    app.state.authenticator = authenticator
    app.state.started = time.time()
    app.include_router(router)
    errors.install(app)
    return app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the coordinator's serve() handles SIGINT/SIGTERM and stops us


def bind(listen: str) -> socket.socket:
    """A listening TCP socket on ``HOST:PORT`` (``[::]:PORT`` for IPv6)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, int(port)), family=family)


class HttpServer:
    """uvicorn on a socket we bound, as an asyncio task; :meth:`stop` lets requests finish."""

    def __init__(
        self, app: FastAPI, listen: str, grace_seconds: float, tls_cert: str = "", tls_key: str = ""
    ) -> None:
        self._socket = bind(listen)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan="off",
            ws="none",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=max(1, int(grace_seconds)),
            ssl_certfile=tls_cert or None,
            ssl_keyfile=tls_key or None,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> HttpServer:
        """Serve on the bound socket in a task and return once uvicorn has started (or raise what
        stopped it)."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:  # startup binds nothing: this takes a few ms
            if self._task.done():
                self._task.result()  # raise what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        """Ask uvicorn to exit, wait for it, then close the socket."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._socket.close()
