"""docker-compose.yml, run as local processes: PostgreSQL, coordinator, admin, two contributors.

The postgres service is replaced by the test PostgreSQL server (only host, port, user, password
and database name of ``MOERGE_DB_URL`` change); every other command and variable is the
compose file's, with container paths and published ports mapped by :mod:`tests.deployment.compose`.
The SuperLink service is not started (Flower's own image; nothing here talks to it yet).
"""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from moerge.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.deployment.compose import REPO
from tests.deployment.conftest import Stack
from tests.deployment.processes import coordinator_process, json_log_lines, run

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]

#: what docs/deployment.md tells the operator to run in the coordinator container
CREATE_ENROLLMENT_TOKEN = (
    'moerge admin tokens create --max-uses 2 -c 127.0.0.1:50051 --token "$MOERGE_ADMIN_TOKEN"'
)
CONTRIBUTORS = ("contributor-alice", "contributor-bob")


def coordinator_env(stack: Stack, database_url: str) -> dict[str, str]:
    """The coordinator service's environment, its database URL aimed at ``database_url``."""
    env = stack.service("coordinator").environment()
    compose_url, local = make_url(env["MOERGE_DB_URL"]), make_url(database_url)
    postgres = stack.compose.service("postgres")["environment"]
    assert compose_url.drivername == "postgresql+psycopg"
    assert compose_url.host == "postgres", "the coordinator must reach the postgres service"
    assert (compose_url.username, compose_url.password, compose_url.database) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    )
    env["MOERGE_DB_URL"] = compose_url.set(
        host=local.host,
        port=local.port,
        username=local.username,
        password=local.password,
        database=local.database,
    ).render_as_string(hide_password=False)
    return env


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with exactly these labels (in any order)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


def test_documented_commands_match_the_compose_file() -> None:
    docs = (REPO / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert CREATE_ENROLLMENT_TOKEN in docs
    assert CREATE_ENROLLMENT_TOKEN in (REPO / "moerge.env.example").read_text(encoding="utf-8")
    for name in CONTRIBUTORS:
        assert name in docs


def test_contributors_experts_reach_the_registry_and_predict_answers(
    stack: Stack, fresh_postgres_url: str, tmp_path: Path
) -> None:
    coordinator = stack.service("coordinator")
    env = coordinator_env(stack, fresh_postgres_url)
    grpc_port, metrics_port = stack.ports[50051], stack.ports[9100]
    with coordinator_process(
        coordinator.command(), env, coordinator.healthcheck(), tmp_path / "logs"
    ):
        created = run(["sh", "-c", coordinator.rewrite(CREATE_ENROLLMENT_TOKEN)], env)
        assert created.returncode == 0, created.stderr
        stack.set_env("MOERGE_ENROLLMENT_TOKEN", created.stdout.strip())

        contributors = {
            name: subprocess.Popen(
                stack.service(name).command(),
                env=stack.service(name).environment(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for name in CONTRIBUTORS
        }
        for name, process in contributors.items():
            output, _ = process.communicate(timeout=240)
            assert process.returncode == 0, f"{name} failed:\n{output[-4000:]}"
            assert "registered: expert" in output

        metadata = (("authorization", f"Bearer {stack.admin_token}"),)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            experts = (
                admin_pb2_grpc.AdminServiceStub(channel)
                .ListExperts(admin_pb2.ListExpertsRequest(), metadata=metadata, timeout=30)
                .experts
            )
            assert sorted(e.name for e in experts) == [
                "alice-movie-review-sentiment",
                "bob-news-topic",
            ]
            assert sorted(e.task_name for e in experts) == ["movie-review-sentiment", "news-topic"]
            inputs = ["a warm, funny and moving film", "shares fell after the bank's results"]
            predicted = inference_pb2_grpc.InferenceServiceStub(channel).Predict(
                inference_pb2.PredictRequest(inputs=inputs, top_k=2), metadata=metadata, timeout=120
            )
        assert len(predicted.predictions) == len(inputs)
        assert all(p.output and p.experts for p in predicted.predictions)

        metrics = scrape(metrics_port)
        join = "/moerge.v1.ContributorService/Join"
        assert sample(metrics, "moerge_grpc_requests_total", method=join, code="OK") == 2
        upload = "/moerge.v1.ContributorService/UploadExpert"
        assert sample(metrics, "moerge_grpc_requests_total", method=upload, code="OK") == 2
        predict = "/moerge.v1.InferenceService/Predict"
        assert sample(metrics, "moerge_grpc_requests_total", method=predict, code="OK") == 1
        assert sample(metrics, "moerge_grpc_request_duration_seconds_count", method=predict) == 1
        assert sample(metrics, "moerge_uploads", state="committed") == 2
        assert sample(metrics, "moerge_upload_bytes", state="committed") > 0
        assert sample(metrics, "moerge_experts", state="active") == 2
        assert sample(metrics, "moerge_adapter_cache_experts") >= 1
        assert sample(metrics, "moerge_adapter_cache_bytes") > 0
        assert sample(metrics, "moerge_predict_batches_total") == 1  # one request, one batch
        assert sample(metrics, "moerge_predict_batched_requests_total") == 1
    # compose sets MOERGE_LOG_JSON=true: every line the coordinator logged is one JSON object
    records = json_log_lines(tmp_path / "logs" / "coordinator.err")
    assert any("coordinator listening" in str(r["msg"]) for r in records)
