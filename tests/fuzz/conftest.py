"""One real coordinator per test module, with an enrolled contributor, an expert and a router.

The fuzzers send their cases to this server over loopback (or, for the file fuzzer, to the
upload handler of its state) and check the oracle in :mod:`tests.fuzz.oracle` after each one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from sqlalchemy.engine import make_url

from moerge.contributor_client.connection import Target
from moerge.contributor_client.upload import upload_expert
from moerge.coordinator.config import CoordinatorConfig
from moerge.storage.records import Principal
from moerge.v1 import admin_pb2, admin_pb2_grpc
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator, bearer
from tests.coordinator.test_server import enroll
from tests.experts import make_expert_dir
from tests.fuzz import budget
from tests.fuzz.oracle import Snapshotter
from tests.tiny_models import make_tiny_bert

MAX_UPLOAD_BYTES = 4 * 1024 * 1024
SHM = Path("/dev/shm")
QUOTAS = ("uploads_per_hour", "upload_bytes_per_hour", "upload_bytes_per_second")


@dataclass
class FuzzServer:
    """The running server and the handles a fuzz case needs."""

    coordinator: BackgroundCoordinator
    channel: grpc.Channel
    admin: tuple[tuple[str, str], ...]
    contributor: tuple[tuple[str, str], ...]
    contributor_id: str
    principal: Principal
    expert_id: str
    expert_dir: Path
    snapshot: Snapshotter
    db: str  # "sqlite" or "postgresql"

    @property
    def state(self):
        return self.coordinator.state


@pytest.fixture(scope="session")
def fuzz_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("fuzz-models") / "tiny-bert")


@pytest.fixture(scope="session")
def fuzz_expert_template(tmp_path_factory: pytest.TempPathFactory, fuzz_base_model: Path) -> Path:
    return make_expert_dir(fuzz_base_model, tmp_path_factory.mktemp("fuzz-experts") / "valid")


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def fuzz_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    fuzz_base_model: Path,
    fuzz_expert_template: Path,
) -> Iterator[FuzzServer]:
    """A coordinator with one contributor, one committed expert, one active router.

    Once on SQLite and once on PostgreSQL (a new database in the session's cluster): the
    PostgreSQL driver refuses input SQLite stores (NUL in text, integers past a column's range).
    """
    root = tmp_path_factory.mktemp("fuzz-server")
    # Thousands of refused uploads each commit a few small transactions: on tmpfs (where there
    # is one) an fsync costs nothing, and the oracle compares contents, not durability.
    data = Path(tempfile.mkdtemp(prefix="moerge-fuzz-", dir=SHM if SHM.is_dir() else root))
    # Upload quotas off: thousands of uploads from one contributor would hit them, and the
    # fuzzers test what happens to input that gets through, not the rate limiter.
    quotas = {f.name: 0 for f in dataclasses.fields(CoordinatorConfig) if f.name in QUOTAS}
    db_url = ""
    cleanup = contextlib.ExitStack()
    if request.param == "postgresql":
        cluster = request.getfixturevalue("postgres_cluster")
        db_url = cluster.create_database()
        cleanup.callback(cluster.drop_database, str(make_url(db_url).database))
    cleanup.callback(shutil.rmtree, data, ignore_errors=True)
    config = coordinator_config(
        data, fuzz_base_model, db_url, max_upload_bytes=MAX_UPLOAD_BYTES, **quotas
    )
    with (
        cleanup,
        BackgroundCoordinator(config) as running,
        grpc.insecure_channel(running.address) as ch,
    ):
        contributor_id, credential = enroll(running.address, config.admin_token, "fuzzer")
        expert_dir = root / "expert"
        shutil.copytree(fuzz_expert_template, expert_dir)
        uploaded = upload_expert(
            Target(address=running.address, token=credential),
            expert_dir,
            "seed-expert",
            "toy",
            progress=False,
        )
        admin_pb2_grpc.AdminServiceStub(ch).TrainRouter(
            admin_pb2.TrainRouterRequest(method="centroid"), metadata=bearer(config.admin_token)
        )
        principal = running.state.registry.authenticate(credential)
        assert principal is not None
        yield FuzzServer(
            coordinator=running,
            channel=ch,
            admin=bearer(config.admin_token),
            contributor=bearer(credential),
            contributor_id=contributor_id,
            principal=principal,
            expert_id=uploaded.expert.expert_id,
            expert_dir=expert_dir,
            snapshot=Snapshotter(running.state),
            db=request.param,
        )


@pytest.fixture(
    params=[pytest.param(False, id="ci"), pytest.param(True, marks=pytest.mark.soak, id="soak")]
)
def soak(request: pytest.FixtureRequest) -> bool:
    """Each fuzzer runs in CI size and, under ``-m soak``, in soak size (on both databases)."""
    if request.param and "soak" not in (request.config.option.markexpr or ""):
        pytest.skip("soak size: run with -m soak (MOERGE_FUZZ_CASES sets the total)")
    return bool(request.param)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if budget.executed:
        terminalreporter.write_line(budget.report())
        target = os.environ.get("MOERGE_FUZZ_REPORT")
        if target:
            budget.save(target)
