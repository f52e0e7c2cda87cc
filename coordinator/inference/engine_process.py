"""Predict's model in a process of its own, so the gRPC event loop and the forwards stop sharing
one GIL (``predict_process = true``).

Why: in one process the event loop (gRPC's per-call work, the handlers) and the engine's model
thread take turns on the GIL. torch releases it around every operator, so a forward on a small
model hands it over hundreds of times, and each hand-over waits for the loop's Python to yield:
``benchmarks/predict_overhead.py`` measured the engine alone at 3.1 ms of CPU per batch of 16
and 22-31 ms while another thread of its process ran Python (2 vCPUs), and on a 16-vCPU machine
0.07x of a bare gRPC echo server's throughput. The serving engines split the same way (vLLM's
V1 engine core runs the model in a process of its own behind the API server).

Layout (two processes, one pipe):

* the **front** (the coordinator) checks a Predict, resolves its router through its own caches
  (so refusals and the response's router version stay where they are), and hands the
  micro-batcher a :class:`RemoteRequest`: plain fields, the router *version* the front chose
  and the registry generation it saw. The batcher's thread sends a whole batch and waits;
* the **engine process** (:func:`serve`) opens the registry and the blob store itself, builds an
  :class:`~moerge.coordinator.inference.service.InferenceService` without a batcher thread of
  its own, resolves each request to the same router (a version is immutable; the active
  experts it is restricted to are re-read whenever the front's registry generation moves, so
  a quarantine seen by the front is obeyed by the engine in the same request) and runs the
  batch through :meth:`InferenceEngine.predict_many`, the path Predict takes in-process.

What crosses the pipe is pickled, as :mod:`multiprocessing` does between a process and the
child it started: requests the front built from validated fields, and predictions (frozen
dataclasses of strings and floats) or refusals as (class name, message). Nothing received from
the network is unpickled. A child that dies fails its batch with INTERNAL and is started again
for the next one.

Route, Generate and composition searches stay on the front's own engine: this is for Predict's
throughput on CPUs (on a GPU it would hold a second copy of the model). Each reply carries the
engine process's adapter-cache stats, which /metrics adds to the front engine's.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from moerge import refusals
from moerge.coordinator.inference.composition_objective import composition_plan
from moerge.coordinator.inference.engine import InferenceRequest
from moerge.coordinator.inference.plan import Aggregation
from moerge.coordinator.inference.results import ExamplePrediction
from moerge.coordinator.inference.service import InferenceService, RemoteRequest
from moerge.coordinator.services.expert_store import ExpertStore
from moerge.coordinator.services.routers import RouterService
from moerge.storage.db import make_engine
from moerge.storage.registry import Registry

if TYPE_CHECKING:
    from moerge.coordinator.config import CoordinatorConfig

log = logging.getLogger(__name__)

#: Seconds the front waits for the engine process to load its model and say it is ready.
START_TIMEOUT_SECONDS = 300.0
#: Refusals that travel back by class name (the status table's classes, most specific first).
REFUSALS: dict[str, type[refusals.Refused]] = {
    cls.__name__: cls
    for cls in (
        refusals.NotFound,
        refusals.AlreadyExists,
        refusals.InvalidArgument,
        refusals.FailedPrecondition,
        refusals.Unauthenticated,
        refusals.PermissionDenied,
        refusals.ResourceExhausted,
        refusals.Refused,
    )
}


@dataclass(frozen=True)
class RemoteRefusal:
    """A refusal raised in the engine process: its class name in :data:`REFUSALS` ("" for an
    unexpected error) and the message the caller may see."""

    kind: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> RemoteRefusal:
        """``exc`` as it travels back (an unexpected error is logged here, with its trace)."""
        for name, refusal in REFUSALS.items():
            if isinstance(exc, refusal):
                return cls(name, str(exc))
        log.error("engine process: unexpected error", exc_info=exc)
        return cls("", f"{type(exc).__name__}: {exc}")

    def exception(self) -> BaseException:
        """The same refusal class with the same message (INTERNAL for an unexpected error)."""
        refusal = REFUSALS.get(self.kind)
        if refusal is None:
            return RuntimeError(f"the engine process failed: {self.message}")
        exc = refusal.__new__(refusal)
        Exception.__init__(exc, self.message)  # InvalidArgument's message names its field already
        return exc


Result = list[ExamplePrediction] | BaseException
#: adapter-cache counters (the rest of ``AdapterCache.stats`` are levels)
COUNTERS = ("hits", "loads", "evictions")


class EngineProcess:
    """The front's handle on the engine process: start it, send batches, restart it if it died.

    :meth:`predict_many` blocks (the micro-batcher calls it on a thread of its own) and sends one
    batch at a time; ``generation`` is the front registry's generation, sent with every batch.
    """

    def __init__(self, config: CoordinatorConfig, generation: Callable[[], int]) -> None:
        self.config = replace(config, predict_process=False)  # the child serves in-process
        self.generation = generation
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self.starts = 0
        #: the engine process's adapter-cache stats after its latest batch, and the counters
        #: of engine processes that died
        self._stats: dict[str, int] = {}
        self._retired = dict.fromkeys(COUNTERS, 0)
        self._start()

    @property
    def pid(self) -> int | None:
        """The engine process's id while it runs."""
        return self._process.pid if self._process is not None else None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded gRPC server
        front, child = context.Pipe()
        process = context.Process(
            target=serve, args=(self.config, child), name="moerge-engine", daemon=True
        )
        process.start()
        child.close()
        self.starts += 1
        if not front.poll(START_TIMEOUT_SECONDS):
            process.kill()
            raise RuntimeError(f"the engine process did not start in {START_TIMEOUT_SECONDS} s")
        try:
            status, detail = front.recv()
        except EOFError:
            process.join(5)
            raise RuntimeError(
                f"the engine process exited while starting (exit code {process.exitcode})"
            ) from None
        if status != "ready":
            process.join(5)
            raise RuntimeError(f"the engine process could not start: {detail}")
        self._process, self._conn = process, front
        log.info("Predict's model runs in engine process %s", process.pid)

    def predict_many(self, requests: Sequence[RemoteRequest]) -> list[Result]:
        """One batch through the engine process: each request's predictions or its error."""
        with self._lock:
            if self._conn is None:
                self._start()
            assert self._conn is not None and self._process is not None
            try:
                self._conn.send((self.generation(), list(requests)))
                replies, self._stats = self._conn.recv()
            except (EOFError, OSError) as exc:
                code = self._process.exitcode
                for key in COUNTERS:  # a restarted engine counts from 0 again
                    self._retired[key] += self._stats.get(key, 0)
                self._stats = {}
                self._stop()
                log.error("the engine process died (exit code %s); restarting it", code)
                raise RuntimeError("the engine process died; it is started again") from exc
        return [r.exception() if isinstance(r, RemoteRefusal) else r for r in replies]

    def cache_stats(self) -> dict[str, int]:
        """The engine process's adapter cache (``AdapterCache.stats``), its counters including
        those of engine processes that died."""
        stats = dict(self._stats)
        for key, value in self._retired.items():
            stats[key] = stats.get(key, 0) + value
        return stats

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(10)
            self._process = None

    def close(self) -> None:
        """Ask the engine process to finish and wait for it."""
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):  # it may be gone already
                    self._conn.send(None)
            self._stop()


# -- the engine process -------------------------------------------------------------------------
class FrontGeneration:
    """The engine process's registry generation: its own writes and the front's generation as
    last sent, so that the service's caches drop what the front saw change."""

    def __init__(self, own: Callable[[], int]) -> None:
        self.own = own
        self.front = 0

    def __call__(self) -> int:
        """One number that moves when either generation does."""
        return (self.front << 32) + self.own()


def open_service(config: CoordinatorConfig) -> tuple[InferenceService, FrontGeneration]:
    """The engine process's inference service over the coordinator's registry and blob store
    (the front migrated the database; expert folders go to a folder of this process's own)."""
    blobs = config.open_blob_store()
    registry = Registry(make_engine(config.database_url), blobs)
    experts = ExpertStore(blobs, Path(config.data_dir) / "experts-engine-process")
    routers = RouterService(registry, blobs, experts, config.router_method)
    generation = FrontGeneration(registry.generation)
    return InferenceService(config, registry, experts, routers, generation=generation), generation


def requests_of(
    service: InferenceService, batch: Sequence[RemoteRequest]
) -> list[InferenceRequest | BaseException]:
    """Each remote request as the engine's :class:`InferenceRequest`, or its refusal."""
    resolved: list[InferenceRequest | BaseException] = []
    for remote in batch:
        try:
            if remote.composition is not None:
                ids, weights = remote.composition
                plan = composition_plan(list(ids), list(weights), len(remote.texts))
            else:
                chosen = service.chosen_now("", remote.router_version, remote.expert_filter)
                aggregation = Aggregation(remote.aggregation) if remote.aggregation else None
                plan = service.request_plan(
                    chosen.router, remote.top_k, aggregation, len(remote.texts)
                )
            resolved.append(InferenceRequest(remote.texts, plan, remote.max_new_tokens or None))
        except Exception as exc:
            resolved.append(exc)
    return resolved


def run_batch(service: InferenceService, batch: Sequence[RemoteRequest]) -> list[object]:
    """Predictions or :class:`RemoteRefusal` per request, in order."""
    resolved = requests_of(service, batch)
    runnable = [r for r in resolved if isinstance(r, InferenceRequest)]
    results = iter(service.engine.predict_many(runnable) if runnable else [])
    replies: list[object] = []
    for item in resolved:
        outcome = next(results) if isinstance(item, InferenceRequest) else item
        replies.append(RemoteRefusal.of(outcome) if isinstance(outcome, BaseException) else outcome)
    return replies


def serve(config: CoordinatorConfig, conn: Connection) -> None:
    """The engine process: build the service, say ready, then answer batches until the front
    sends ``None`` or goes away."""
    from moerge.coordinator.logs import setup_logging

    setup_logging(json_lines=config.log_json)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front's; it closes us
    try:
        service, generation = open_service(config)
    except BaseException as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise
    conn.send(("ready", os.getpid()))

    def answer() -> None:  # on the model thread: no hand-over between two threads per batch
        while True:
            try:
                message = conn.recv()
            except EOFError:
                break  # the front is gone
            if message is None:
                break
            generation.front, batch = message
            conn.send((run_batch(service, batch), service.engine.cache.stats()))

    try:
        service.engine.executor.submit(answer).result()
    finally:
        service.engine.close()
