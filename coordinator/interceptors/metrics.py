"""Prometheus metrics: per-RPC counts and latencies, plus registry and cache gauges, over HTTP.

Built on ``prometheus_client`` (exposition, OpenMetrics negotiation, process and GC metrics),
one :class:`~prometheus_client.CollectorRegistry` per coordinator so that several can live in
one process (tests). Three parts:

* :class:`RpcMetrics` holds the request counter and latency histogram that
  :class:`MetricsInterceptor` (a gRPC server interceptor, installed first so that it also sees
  the calls the auth interceptor rejects) updates per method and status code;
* :class:`StateCollector` reads, at scrape time, uploads by state (count and bytes), experts by
  state, router versions by status, the active router version, and the inference adapter cache;
* :class:`MetricsHTTPServer` answers ``GET /metrics`` from a thread, so that a scrape that reads
  the database never blocks the gRPC event loop. It listens only when ``metrics_listen`` is set.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from moerge.coordinator.inference.device import Placement, resolve_placement

if TYPE_CHECKING:
    from moerge.coordinator.state import CoordinatorState

log = logging.getLogger(__name__)

#: latency histogram bucket bounds, seconds (Predict on CPU is milliseconds to seconds)
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class RpcMetrics:
    """Per-RPC metrics on a registry of their own (with the process and GC collectors)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._requests = Counter(
            "moerge_grpc_requests",
            "gRPC requests finished, by full method name and status code",
            ("method", "code"),
            registry=self.registry,
        )
        self._latency = Histogram(
            "moerge_grpc_request_duration_seconds",
            "gRPC request handling time, by full method name",
            ("method",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        #: (method, code) -> (its request counter, its latency histogram); served methods and
        #: status codes are both finite sets
        self._children: dict[tuple[str, grpc.StatusCode], tuple[Any, Any]] = {}

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        # the labelled children are looked up once per (method, code): ``labels()`` takes a
        # lock and builds a key on every call: 7 us per RPC, 2.3 us with them remembered
        """Count one call and its latency under its method and status code."""
        children = self._children.get((method, code))
        if children is None:
            children = (self._requests.labels(method, code.name), self._latency.labels(method))
            self._children[(method, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def requests(self, method: str, code: str = "OK") -> int:
        """Calls counted for a method and status code (for tests and benchmarks)."""
        value = self.registry.get_sample_value(
            "moerge_grpc_requests_total", {"method": method, "code": code}
        )
        return int(value or 0)


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
        """Wrap the method's handler so each call is counted and timed."""
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

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(timed(handler.unary_unary), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(timed(handler.stream_unary), **kwargs)
        if handler.unary_stream:
            if not (
                inspect.isasyncgenfunction(handler.unary_stream)
                or inspect.iscoroutinefunction(handler.unary_stream)
            ):
                return handler  # a sync generator: leave it alone rather than block the loop
            return grpc.unary_stream_rpc_method_handler(timed(handler.unary_stream), **kwargs)
        if not (
            inspect.isasyncgenfunction(handler.stream_stream)
            or inspect.iscoroutinefunction(handler.stream_stream)
        ):
            return handler
        return grpc.stream_stream_rpc_method_handler(timed(handler.stream_stream), **kwargs)


class StateCollector(Collector):
    """Gauges read from the registry and the inference engine when Prometheus scrapes."""

    def __init__(self, state: CoordinatorState) -> None:
        self.state = state
        self.placement: Placement | None = None  # resolved at the first scrape

    def collect(self) -> Iterator[Metric]:
        """The registry's gauges at scrape time; a failed read logs and yields nothing rather than
        failing the scrape."""
        try:
            families = self._families()
        except Exception:  # a scrape must never take the coordinator down; RPC metrics stay
            log.exception("metrics: reading the registry's gauges failed")
            return
        yield from families

    def _families(self) -> list[Metric]:
        from moerge.storage.models import Expert, RouterVersion, Upload
        from moerge.storage.records import EXPERT_STATES, UPLOAD_STATES

        state = self.state
        with state.engine.connect() as connection:
            uploads = {
                s: (n, b)
                for s, n, b in connection.execute(
                    select(
                        Upload.state,
                        func.count(),
                        func.coalesce(func.sum(Upload.received_bytes), 0),
                    ).group_by(Upload.state)
                )
            }
            experts = dict(
                connection.execute(select(Expert.state, func.count()).group_by(Expert.state)).all()
            )
            routers = dict(
                connection.execute(
                    select(RouterVersion.status, func.count()).group_by(RouterVersion.status)
                ).all()
            )
            active = connection.execute(
                select(RouterVersion.version).where(RouterVersion.active.is_(True))
            ).scalar()
        families = [
            _by_label(
                "moerge_uploads",
                "expert uploads in the registry, by state",
                "state",
                {s: uploads.get(s, (0, 0))[0] for s in UPLOAD_STATES},
            ),
            _by_label(
                "moerge_upload_bytes",
                "bytes received by expert uploads, by state",
                "state",
                {s: uploads.get(s, (0, 0))[1] for s in UPLOAD_STATES},
            ),
            _by_label(
                "moerge_experts",
                "registered experts, by state",
                "state",
                {s: experts.get(s, 0) for s in EXPERT_STATES},
            ),
            _by_label(
                "moerge_router_versions",
                "router fits, by status",
                "status",
                dict(sorted(routers.items())),
            ),
            GaugeMetricFamily(
                "moerge_router_active_version",
                "the active router version (0: none yet)",
                value=active or 0,
            ),
        ]
        inference = state.inference
        stats = inference.cache_stats() if inference is not None else {}
        families += [
            GaugeMetricFamily(
                "moerge_adapter_cache_bytes",
                "LoRA weights resident in the adapter cache",
                value=stats.get("resident_bytes", 0),
            ),
            GaugeMetricFamily(
                "moerge_adapter_cache_budget_bytes",
                "the adapter cache's byte budget",
                value=stats.get("budget_bytes", state.config.adapter_cache_bytes),
            ),
            GaugeMetricFamily(
                "moerge_adapter_cache_experts",
                "experts resident in the adapter cache",
                value=stats.get("resident", 0),
            ),
        ]
        for key, text in (
            ("hits", "cache hits"),
            ("loads", "experts loaded"),
            ("evictions", "experts evicted"),
        ):
            families.append(
                CounterMetricFamily(
                    f"moerge_adapter_cache_{key}", f"adapter cache: {text}", value=stats.get(key, 0)
                )
            )
        return families + self._inference_families()

    def _inference_families(self) -> list[Metric]:
        """Where inference runs, how Predict batches, and the generation scheduler's load and
        output."""
        if self.placement is None:
            self.placement = resolve_placement(self.state.config.device, self.state.config.dtype)
        info = InfoMetricFamily("moerge_inference_device", "the inference device and precision")
        info.add_metric(
            [],
            {
                "device": self.placement.device,
                "dtype": self.placement.dtype,
                "task_type": self.state.config.task_type,
            },
        )
        inference = self.state.inference
        engine = inference.engine if inference is not None else None
        batcher = inference.batcher if inference is not None else None
        scheduler = getattr(engine, "_scheduler", None)
        running, waiting = scheduler.load if scheduler is not None else (0, 0)
        graphs = scheduler.graphs if scheduler is not None else None
        counters = (  # (name, help, value): a counter's name gets _total in the exposition
            ("moerge_predict_batches", "engine batches run for Predict", _of(batcher, "batches")),
            (
                "moerge_predict_batched_requests",
                "Predict requests served in those batches (over batches: the mean batch size)",
                _of(batcher, "items"),
            ),
            ("moerge_generation_tokens", "tokens generated by Generate", _of(scheduler, "tokens")),
            ("moerge_generation_steps", "decode steps run by Generate", _of(scheduler, "steps")),
            (
                "moerge_generation_admissions",
                "rounds in which the generation worker admitted waiting requests",
                _of(scheduler, "admissions"),
            ),
            (
                "moerge_generation_admitted_requests",
                "Generate requests admitted in those rounds (over rounds: requests per round)",
                _of(scheduler, "admitted"),
            ),
            (
                "moerge_generation_graph_replays",
                "decode steps replayed from a captured CUDA graph",
                _of(graphs, "replays"),
            ),
            (
                "moerge_generation_graph_captures",
                "decode steps captured as CUDA graphs (one per batch shape)",
                _of(graphs, "captures"),
            ),
        )
        gauges = (
            ("moerge_generation_running", "Generate requests in the running batch", running),
            ("moerge_generation_waiting", "Generate requests waiting for a row", waiting),
            (
                "moerge_generation_graphs_pending",
                "CUDA graphs of recent batch shapes the idle worker has yet to capture",
                _of(scheduler, "graphs_pending"),
            ),
        )
        return [
            info,
            *(CounterMetricFamily(name, text, value=value) for name, text, value in counters),
            *(GaugeMetricFamily(name, text, value=value) for name, text, value in gauges),
            _generation_seconds(scheduler),
        ]


def _of(source: Any, attribute: str) -> float:
    """``source.attribute``, or 0 where there is no source (no engine, no scheduler yet)."""
    return float(getattr(source, attribute)) if source is not None else 0.0


def _generation_seconds(scheduler: Any) -> Metric:
    """The generation worker's time by phase: where a slow time to first token went."""
    family = CounterMetricFamily(
        "moerge_generation_seconds",
        "generation worker time by phase (route: embed, tokenize and bind newcomers; prefill; "
        "decode; capture: CUDA graph captures)",
        labels=("phase",),
    )
    seconds = dict(scheduler.seconds) if scheduler is not None else {}
    graphs = scheduler.graphs if scheduler is not None else None
    seconds["capture"] = graphs.capture_seconds if graphs is not None else 0.0
    for phase in ("route", "prefill", "decode", "capture"):
        family.add_metric((phase,), seconds.get(phase, 0.0))
    return family


def _by_label(name: str, documentation: str, label: str, values: dict[str, float]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=(label,))
    for key, value in values.items():
        family.add_metric((key,), value)
    return family


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class MetricsHTTPServer:
    """``GET /metrics`` on ``host:port`` in a daemon thread; ``port`` is the bound port.

    ``prometheus_client``'s WSGI app does the exposition (text or OpenMetrics, as the scraper
    asks, gzip); other paths are 404.
    """

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        host, _, port = listen.rpartition(":")
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"only /metrics is served here\n"]
            return metrics_app(environ, start_response)

        self._server = make_server(
            host.strip("[]") or "0.0.0.0",
            int(port),
            app,
            _ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> MetricsHTTPServer:
        """Serve /metrics from a daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut the server down and wait for its thread (5 s at most)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def collector(rpc: RpcMetrics, state: CoordinatorState) -> CollectorRegistry:
    """The registry one scrape shows: RPC and process metrics, then the state gauges."""
    rpc.registry.register(StateCollector(state))
    return rpc.registry
