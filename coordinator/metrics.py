"""Prometheus metrics: per-RPC counts and latencies, plus registry and cache gauges, over HTTP.

Why hand-written: the text exposition format is a few lines of code, and the coordinator image
should not need another dependency for it. Three parts:

* :class:`RpcMetrics` holds the counters and latency histograms that
  :class:`MetricsInterceptor` (a gRPC server interceptor, installed first so that it also sees
  the calls the auth interceptor rejects) updates per method and status code;
* :func:`state_samples` reads, at scrape time, uploads by state (count and bytes), experts by
  state, router versions by status, the active router version, and the inference adapter cache;
* :class:`MetricsHTTPServer` answers ``GET /metrics`` from a thread, so that a scrape that reads
  the database never blocks the gRPC event loop. It listens only when ``metrics_listen`` is set.
"""

from __future__ import annotations

import bisect
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import grpc
from sqlalchemy import func, select

if TYPE_CHECKING:
    from moerge.coordinator.state import CoordinatorState

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: latency histogram bucket bounds, seconds (Predict on CPU is milliseconds to seconds)
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


@dataclass(frozen=True)
class Sample:
    """One exposition line: ``name{labels} value``."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass(frozen=True)
class Family:
    """A metric family: its ``# HELP``/``# TYPE`` header and its samples."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    samples: tuple[Sample, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for sample in family.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sample.labels)
            lines.append(f"{sample.name}{{{labels}}} {_number(sample.value)}" if labels
                         else f"{sample.name} {_number(sample.value)}")
    return "\n".join(lines) + "\n"


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    count: int = 0


class RpcMetrics:
    """Thread-safe per-RPC counters: requests by (method, code) and latency by method."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {}
        self._latency: dict[str, _Histogram] = {}

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        with self._lock:
            key = (method, code.name)
            self._requests[key] = self._requests.get(key, 0) + 1
            histogram = self._latency.setdefault(method, _Histogram())
            index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
            if index < len(LATENCY_BUCKETS):
                histogram.counts[index] += 1
            histogram.total += seconds
            histogram.count += 1

    def requests(self, method: str, code: str = "OK") -> int:
        with self._lock:
            return self._requests.get((method, code), 0)

    def families(self) -> list[Family]:
        with self._lock:
            requests = sorted(self._requests.items())
            latency = sorted((m, _Histogram(list(h.counts), h.total, h.count))
                             for m, h in self._latency.items())
        count_samples = tuple(
            Sample("moerge_grpc_requests_total", (("method", m), ("code", c)), n)
            for (m, c), n in requests
        )
        hist_samples: list[Sample] = []
        for method, histogram in latency:
            cumulative = 0
            for bound, n in zip(LATENCY_BUCKETS, histogram.counts, strict=True):
                cumulative += n
                labels = (("method", method), ("le", _number(bound)))
                hist_samples.append(
                    Sample("moerge_grpc_request_duration_seconds_bucket", labels, cumulative))
            hist_samples.append(Sample("moerge_grpc_request_duration_seconds_bucket",
                                       (("method", method), ("le", "+Inf")), histogram.count))
            hist_samples.append(Sample("moerge_grpc_request_duration_seconds_sum",
                                       (("method", method),), histogram.total))
            hist_samples.append(Sample("moerge_grpc_request_duration_seconds_count",
                                       (("method", method),), histogram.count))
        return [
            Family("moerge_grpc_requests_total", "counter",
                   "gRPC requests finished, by full method name and status code", count_samples),
            Family("moerge_grpc_request_duration_seconds", "histogram",
                   "gRPC request handling time, by full method name", tuple(hist_samples)),
        ]


def _status(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the call ends with: what the servicer set, else OK, or UNKNOWN if it raised."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions report the raw integer
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, BaseException) and type(error).__name__ == "CancelledError":
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Times every RPC and counts it by method and final status code."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrap(handler, handler_call_details.method)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        observe = self.metrics.observe

        def timed(behaviour: Any) -> Any:
            if inspect.isasyncgenfunction(behaviour):
                async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    start, error = time.perf_counter(), None
                    try:
                        async for item in behaviour(request, context):
                            yield item
                    except BaseException as exc:
                        error = exc
                        raise
                    finally:
                        observe(method, _status(context, error), time.perf_counter() - start)

                return stream

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start, error = time.perf_counter(), None
                try:
                    result = behaviour(request, context)
                    return await result if inspect.isawaitable(result) else result
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    observe(method, _status(context, error), time.perf_counter() - start)

            return call

        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(timed(handler.unary_unary), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(timed(handler.stream_unary), **kwargs)
        if handler.unary_stream:
            if not (inspect.isasyncgenfunction(handler.unary_stream)
                    or inspect.iscoroutinefunction(handler.unary_stream)):
                return handler  # a sync generator: leave it alone rather than block the loop
            return grpc.unary_stream_rpc_method_handler(timed(handler.unary_stream), **kwargs)
        if not (inspect.isasyncgenfunction(handler.stream_stream)
                or inspect.iscoroutinefunction(handler.stream_stream)):
            return handler
        return grpc.stream_stream_rpc_method_handler(timed(handler.stream_stream), **kwargs)


def state_samples(state: CoordinatorState) -> list[Family]:
    """Gauges read from the registry and the inference engine when Prometheus scrapes."""
    from moerge.storage.models import Expert, RouterVersion, Upload
    from moerge.storage.records import EXPERT_STATES, UPLOAD_STATES

    with state.engine.connect() as connection:
        uploads = {s: (n, b) for s, n, b in connection.execute(
            select(Upload.state, func.count(), func.coalesce(func.sum(Upload.received_bytes), 0))
            .group_by(Upload.state))}
        experts = dict(connection.execute(  # type: ignore[arg-type]
            select(Expert.state, func.count()).group_by(Expert.state)).all())
        routers = dict(connection.execute(  # type: ignore[arg-type]
            select(RouterVersion.status, func.count()).group_by(RouterVersion.status)).all())
        active = connection.execute(
            select(RouterVersion.version).where(RouterVersion.active.is_(True))).scalar()
    families = [
        Family("moerge_uploads", "gauge", "expert uploads in the registry, by state",
               tuple(Sample("moerge_uploads", (("state", s),), uploads.get(s, (0, 0))[0])
                     for s in UPLOAD_STATES)),
        Family("moerge_upload_bytes", "gauge", "bytes received by expert uploads, by state",
               tuple(Sample("moerge_upload_bytes", (("state", s),), uploads.get(s, (0, 0))[1])
                     for s in UPLOAD_STATES)),
        Family("moerge_experts", "gauge", "registered experts, by state",
               tuple(Sample("moerge_experts", (("state", s),), experts.get(s, 0))
                     for s in EXPERT_STATES)),
        Family("moerge_router_versions", "gauge", "router fits, by status",
               tuple(Sample("moerge_router_versions", (("status", s),), n)
                     for s, n in sorted(routers.items()))),
        Family("moerge_router_active_version", "gauge",
               "the active router version (0: none yet)",
               (Sample("moerge_router_active_version", (), active or 0),)),
    ]
    inference = state.inference
    stats = inference.engine.cache.stats() if inference is not None else {}  # type: ignore[attr-defined]
    families += [
        Family("moerge_adapter_cache_bytes", "gauge", "LoRA weights resident in the adapter cache",
               (Sample("moerge_adapter_cache_bytes", (), stats.get("resident_bytes", 0)),)),
        Family("moerge_adapter_cache_budget_bytes", "gauge", "the adapter cache's byte budget",
               (Sample("moerge_adapter_cache_budget_bytes", (),
                       stats.get("budget_bytes", state.config.adapter_cache_bytes)),)),
        Family("moerge_adapter_cache_experts", "gauge", "experts resident in the adapter cache",
               (Sample("moerge_adapter_cache_experts", (), stats.get("resident", 0)),)),
    ]
    for key, text in (("hits", "cache hits"), ("loads", "experts loaded"),
                      ("evictions", "experts evicted")):
        name = f"moerge_adapter_cache_{key}_total"
        families.append(Family(name, "counter", f"adapter cache: {text}",
                               (Sample(name, (), stats.get(key, 0)),)))
    return families


class MetricsHTTPServer:
    """``GET /metrics`` on ``host:port`` in a daemon thread; ``port`` is the bound port."""

    def __init__(self, listen: str, collect: Callable[[], Iterable[Family]]) -> None:
        host, _, port = listen.rpartition(":")
        collect_families = collect

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = render(collect_families()).encode()
                except Exception:  # a scrape must never take the coordinator down
                    log.exception("metrics collection failed")
                    self.send_error(500, "metrics collection failed")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics: " + format, *args)

        self._server = ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> MetricsHTTPServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def collector(rpc: RpcMetrics, state: CoordinatorState) -> Callable[[], Iterator[Family]]:
    """Everything one scrape shows: RPC metrics, then the state gauges."""

    def collect() -> Iterator[Family]:
        yield from rpc.families()
        yield from state_samples(state)

    return collect
