"""The Prometheus endpoint: scraped over HTTP from a real coordinator after real RPCs."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moerge.coordinator.config import CoordinatorConfig
from moerge.storage.tokens import new_token
from moerge.v1 import admin_pb2, admin_pb2_grpc, contributor_pb2, contributor_pb2_grpc
from tests.coordinator.harness import BackgroundCoordinator
from tests.deployment.test_compose import sample, scrape

LIST_EXPERTS = "/moerge.v1.AdminService/ListExperts"
GET_BASE_MODEL = "/moerge.v1.ContributorService/GetBaseModel"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def config(tmp_path: Path, base_model: Path, metrics_listen: str) -> CoordinatorConfig:
    return CoordinatorConfig(
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        admin_token=new_token("mga")[1],
        base_model=str(base_model),
        base_model_id="tiny-bert",
        auto_retrain=False,
        metrics_listen=metrics_listen,
    )


@pytest.fixture
def coordinator(tmp_path: Path, tiny_base_model: Path) -> Iterator[BackgroundCoordinator]:
    with BackgroundCoordinator(config(tmp_path, tiny_base_model, "127.0.0.1:0")) as running:
        yield running


def metrics_port(coordinator: BackgroundCoordinator) -> int:
    assert coordinator.running is not None and coordinator.running.metrics_http is not None
    return coordinator.running.metrics_http.port


def test_scrape_counts_requests_by_method_and_status_code(
    coordinator: BackgroundCoordinator,
) -> None:
    admin = (("authorization", f"Bearer {coordinator.admin_token()}"),)
    with grpc.insecure_channel(coordinator.address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        experts = admin_pb2_grpc.AdminServiceStub(channel)
        experts.ListExperts(admin_pb2.ListExpertsRequest(), metadata=admin, timeout=10)
        experts.ListExperts(admin_pb2.ListExpertsRequest(), metadata=admin, timeout=10)
        with pytest.raises(grpc.RpcError) as unauthenticated:
            experts.ListExperts(admin_pb2.ListExpertsRequest(), timeout=10)
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as denied:  # admins may not call contributor methods
            contributor_pb2_grpc.ContributorServiceStub(channel).GetBaseModel(
                contributor_pb2.GetBaseModelRequest(), metadata=admin, timeout=10
            )
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    text = scrape(metrics_port(coordinator))
    requests = "moerge_grpc_requests_total"
    assert sample(text, requests, method=HEALTH_CHECK, code="OK") == 1
    assert sample(text, requests, method=LIST_EXPERTS, code="OK") == 2
    assert sample(text, requests, method=LIST_EXPERTS, code="UNAUTHENTICATED") == 1
    assert sample(text, requests, method=GET_BASE_MODEL, code="PERMISSION_DENIED") == 1
    duration = "moerge_grpc_request_duration_seconds"
    assert sample(text, f"{duration}_count", method=LIST_EXPERTS) == 3
    assert sample(text, f"{duration}_bucket", method=LIST_EXPERTS, le="+Inf") == 3
    assert sample(text, f"{duration}_sum", method=LIST_EXPERTS) > 0
    assert "# TYPE moerge_grpc_requests_total counter" in text
    assert "# TYPE moerge_grpc_request_duration_seconds histogram" in text


def test_scrape_reports_empty_registry_and_cold_adapter_cache(
    coordinator: BackgroundCoordinator,
) -> None:
    text = scrape(metrics_port(coordinator))
    assert sample(text, "moerge_uploads", state="committed") == 0
    assert sample(text, "moerge_upload_bytes", state="receiving") == 0
    assert sample(text, "moerge_experts", state="active") == 0
    assert sample(text, "moerge_router_active_version") == 0
    assert sample(text, "moerge_adapter_cache_experts") == 0
    assert sample(text, "moerge_predict_batches_total") == 0
    budget = coordinator.config.adapter_cache_bytes
    assert sample(text, "moerge_adapter_cache_budget_bytes") == budget


def test_only_the_metrics_path_is_served(coordinator: BackgroundCoordinator) -> None:
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port(coordinator)}/", timeout=10)
    assert missing.value.code == 404


def test_metrics_endpoint_is_off_by_default(tmp_path: Path, tiny_base_model: Path) -> None:
    assert CoordinatorConfig.metrics_listen == ""
    with BackgroundCoordinator(config(tmp_path, tiny_base_model, "")) as running:
        assert running.running is not None and running.running.metrics_http is None


def test_scrape_has_process_metrics_and_speaks_openmetrics_when_asked(
    coordinator: BackgroundCoordinator,
) -> None:
    """prometheus_client's exposition: process/GC collectors and OpenMetrics negotiation."""
    text = scrape(metrics_port(coordinator))
    assert sample(text, "process_resident_memory_bytes") > 0
    assert "python_gc_collections_total" in text
    request = urllib.request.Request(
        f"http://127.0.0.1:{metrics_port(coordinator)}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        body = response.read().decode()
    assert body.rstrip().endswith("# EOF")
    assert "# TYPE moerge_grpc_requests counter" in body


def test_streaming_health_watch_still_works_through_the_interceptor(
    coordinator: BackgroundCoordinator,
) -> None:
    with grpc.insecure_channel(coordinator.address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        first = next(stream)
        stream.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
