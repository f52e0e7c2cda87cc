"""The coordinator's asyncio gRPC server: services, auth, health, reflection, TLS, shutdown.

``serve(config)`` runs until SIGINT/SIGTERM; :func:`start` returns a running server (tests bind
``127.0.0.1:0`` and read the chosen port).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moerge.coordinator.config import CoordinatorConfig
from moerge.coordinator.inference.device import resolve_placement
from moerge.coordinator.interceptors.auth import AuthInterceptor
from moerge.coordinator.interceptors.decoding import DecodeInterceptor
from moerge.coordinator.interceptors.inference_limit import InferenceLimiter
from moerge.coordinator.interceptors.metrics import (
    MetricsHTTPServer,
    MetricsInterceptor,
    RpcMetrics,
    collector,
)
from moerge.coordinator.interceptors.rate_limit import UploadLimiter
from moerge.coordinator.rpc.servicers import AdminServicer, ContributorServicer, InferenceServicer
from moerge.coordinator.services.node_keys import admit_node_keys
from moerge.coordinator.services.routers import open_federation
from moerge.coordinator.state import CoordinatorState
from moerge.coordinator.uploads.screening import install as install_screen
from moerge.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    contributor_pb2,
    contributor_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

if TYPE_CHECKING:
    from moerge.coordinator.http.app import HttpServer

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    contributor_pb2.DESCRIPTOR.services_by_name["ContributorService"].full_name,
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


CONTRIBUTOR, INFERENCE, ADMIN = SERVICE_NAMES


def served_services(config: CoordinatorConfig) -> tuple[str, ...]:
    """All three services, or InferenceService alone on an inference-only replica."""
    return (INFERENCE,) if config.role == "inference" else SERVICE_NAMES


@dataclass
class RunningServer:
    """A started coordinator: the gRPC server, its state and the optional metrics and HTTP
    servers."""

    server: grpc.aio.Server
    state: CoordinatorState
    port: int
    health: health.aio.HealthServicer
    metrics: RpcMetrics
    metrics_http: MetricsHTTPServer | None = None  # set when config.metrics_listen is
    http: HttpServer | None = None  # the HTTP API, when config.http_listen is set

    @property
    def http_port(self) -> int | None:
        """The HTTP API's port, or None when it is off."""
        return self.http.port if self.http is not None else None

    @property
    def address(self) -> str:
        """The gRPC address a local client dials."""
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting RPCs, let in-flight ones finish (up to ``grace``), close the state."""
        await self.health.enter_graceful_shutdown()
        grace = grace if grace is not None else self.state.config.grace_seconds
        if self.http is not None:  # beside gRPC: in-flight requests of both finish in the grace
            await asyncio.gather(self.http.stop(), self.server.stop(grace))
        else:
            await self.server.stop(grace)
        if self.metrics_http is not None:
            await asyncio.to_thread(self.metrics_http.stop)
        await self.state.aclose()


async def start(config: CoordinatorConfig, state: CoordinatorState | None = None) -> RunningServer:
    """Open the registry (migrating it), bind the port and start serving."""
    if state is None:
        state = await asyncio.to_thread(CoordinatorState.open, config)
    install_screen(state)  # poisoning checks at upload commit and before router fits
    # Resolve the inference device now: a missing GPU stops the start instead of a first request
    placement = await asyncio.to_thread(resolve_placement, config.device, config.dtype)
    log.info(
        "inference on %s (task %s, base model %s)",
        placement.description,
        config.task_type,
        config.base_model_id,
    )
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    # Metrics first: it is the outermost interceptor, so it also counts calls auth rejects.
    metrics = RpcMetrics()
    auth = AuthInterceptor(
        state.registry.authenticate,
        state.registry.generation,
        InferenceLimiter(config.inference_requests_per_minute, state.buckets),
    )
    server = grpc.aio.server(
        interceptors=[
            MetricsInterceptor(metrics),
            auth,
            DecodeInterceptor(),  # innermost: undecodable requests become INVALID_ARGUMENT
        ],
        options=options,
    )
    services = served_services(config)
    if CONTRIBUTOR in services:  # an inference-only replica (role) takes no uploads
        limits = UploadLimiter.from_config(config, state.buckets)  # both upload paths
        contributor_pb2_grpc.add_ContributorServiceServicer_to_server(
            ContributorServicer(state, limits), server
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(state), server)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(state), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if config.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
        )
        port = server.add_secure_port(config.listen, credentials)
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    http = None
    if config.http_listen:  # the same handlers, in this loop, over HTTP (docs/http-api.md)
        from moerge.coordinator.http.app import HttpServer, build_app  # FastAPI only when used

        # bound now: a busy port stops the start, as a busy gRPC port does
        http = HttpServer(
            build_app(state, auth),
            config.http_listen,
            config.grace_seconds,
            config.tls_cert,
            config.tls_key,
        )
    await server.start()
    for name in ("", *services):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_http = None
    if config.metrics_listen:
        metrics_http = MetricsHTTPServer(config.metrics_listen, collector(metrics, state)).start()
        log.info(
            "metrics on http://%s:%d/metrics",
            config.metrics_listen.rsplit(":", 1)[0],
            metrics_http.port,
        )
    if http is not None:
        await http.start()
        log.info(
            "HTTP API on %s://%s:%d/v1",
            "https" if config.tls_cert else "http",
            config.http_listen.rsplit(":", 1)[0],
            http.port,
        )
    # A SuperLink for federated rounds (config `superlink`) before the scheduler can train.
    state.routers.federation = await asyncio.to_thread(open_federation, config)
    await asyncio.to_thread(admit_node_keys, state)  # revocations while it was down
    await state.start_background()
    log.info(
        "coordinator listening on %s (tls=%s)",
        config.listen.rsplit(":", 1)[0] + f":{port}",
        bool(config.tls_cert),
    )
    return RunningServer(
        server=server,
        state=state,
        port=port,
        health=health_servicer,
        metrics=metrics,
        metrics_http=metrics_http,
        http=http,
    )


async def serve(config: CoordinatorConfig) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    running = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"moerge coordinator serving on port {running.port}", flush=True)
    await stop.wait()
    log.info("shutting down (grace %.1fs)", config.grace_seconds)
    await running.stop()
