"""The compose file's scaled profile: MinIO, two coordinator replicas, an nginx gRPC balancer.

Docker does not run here, so these check the entry points and variables the containers get:
both replicas are the single coordinator's settings plus the object store, on their own
volumes; the balancer's nginx config passes gRPC (HTTP/2) and HTTP to both; the bucket MinIO's
set-up creates is the one the replicas use; and the replicas' environment is a configuration
the coordinator accepts. Replicas as real processes: tests/reliability/test_replicas.py.
"""

from __future__ import annotations

import os
import re

import pytest

from moerge.coordinator.config import CoordinatorConfig
from tests.deployment.compose import REPO
from tests.deployment.conftest import Stack

REPLICAS = ("coordinator-1", "coordinator-2")


def test_scaled_services_are_in_the_scaled_profile_only(stack: Stack) -> None:
    for name in ("minio", "minio-setup", *REPLICAS, "balancer"):
        assert stack.compose.service(name)["profiles"] == ["scaled"]
    assert "profiles" not in stack.compose.service("coordinator")  # the single-node default


def test_replicas_are_the_coordinator_plus_the_object_store_on_their_own_volumes(
    stack: Stack,
) -> None:
    single = stack.compose.service("coordinator")
    volumes = set()
    for name in REPLICAS:
        replica = stack.compose.service(name)
        env = replica["environment"]
        assert {k: v for k, v in env.items() if k in single["environment"]} == single[
            "environment"
        ]  # same database, listen address, metrics, HTTP API
        assert env["MOERGE_BLOB_STORE"] == "s3://moerge/blobs"
        assert env["MOERGE_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
        assert replica["command"] == single["command"]
        assert "ports" not in replica  # reached through the balancer
        volumes.update(replica["volumes"])
        assert replica["depends_on"]["minio-setup"]["condition"] == (
            "service_completed_successfully"
        )
    assert len(volumes) == 2  # each replica its own cache folder


def test_minio_setup_creates_the_bucket_the_replicas_use(stack: Stack) -> None:
    script = " ".join(stack.compose.service("minio-setup")["entrypoint"])
    bucket = stack.compose.service("coordinator-1")["environment"]["MOERGE_BLOB_STORE"]
    assert f"mc mb --ignore-existing local/{bucket.removeprefix('s3://').split('/')[0]}" in script
    # the replicas sign with MinIO's root credentials (same variables, same defaults)
    minio = stack.compose.service("minio")["environment"]
    replica = stack.compose.service("coordinator-1")["environment"]
    assert (replica["AWS_ACCESS_KEY_ID"], replica["AWS_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )


def test_the_balancer_passes_grpc_and_http_to_both_replicas(stack: Stack) -> None:
    balancer = stack.compose.service("balancer")
    mount = next(v for v in balancer["volumes"] if "nginx" in v)
    config = (REPO / mount.split(":")[0]).read_text()
    assert re.search(r"listen 50051 http2;", config)
    assert "grpc_pass grpc://moerge_grpc;" in config
    for replica in REPLICAS:
        assert f"server {replica}:50051;" in config
        assert f"server {replica}:8000;" in config
    assert sorted(balancer["ports"]) == ["50051:50051", "8000:8000"]
    assert set(balancer["depends_on"]) == set(REPLICAS)


@pytest.mark.parametrize("name", REPLICAS)
def test_a_replicas_environment_is_a_configuration_the_coordinator_accepts(
    stack: Stack, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = stack.service(name).environment()
    for key in [k for k in os.environ if k.startswith("MOERGE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("MOERGE_"):
            monkeypatch.setenv(key, value)
    config = CoordinatorConfig.load()
    assert config.blob_store == "s3://moerge/blobs"
    assert config.role == "all" and config.object_part_bytes > 0
    assert config.db_url.startswith("postgresql+psycopg://")
