"""Run a real coordinator on 127.0.0.1:0 in a background event loop, for synchronous tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from moerge.coordinator.config import CoordinatorConfig
from moerge.coordinator.server import RunningServer, start


class BackgroundCoordinator:
    """The asyncio server in its own thread; tests talk to it with plain sync gRPC clients."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.running: RunningServer | None = None

    def __enter__(self) -> BackgroundCoordinator:
        self.thread.start()
        self.running = asyncio.run_coroutine_threadsafe(start(self.config), self.loop).result(120)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.stop(grace=1.0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def state(self):
        assert self.running is not None
        return self.running.state

    @property
    def address(self) -> str:
        assert self.running is not None
        return f"127.0.0.1:{self.running.port}"

    def admin_token(self) -> str:
        return self.config.admin_token

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(120)


@contextmanager
def channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as ch:
        yield ch


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
