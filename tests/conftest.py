"""Shared fixtures: databases of each kind the coordinator supports, for tests that use SQL.

``db_url`` runs a test once on SQLite and once on PostgreSQL. The PostgreSQL cluster starts
at most once per session, and only if a test asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.postgres import PostgresCluster, find_postgres_bin
from tests.s3server import S3Server


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A private PostgreSQL server for the whole session, removed at the end."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH "
            "or in /usr/lib/postgresql/*/bin"
        )
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """URL of one database shared by the session (``postgresql+psycopg://...``)."""
    return postgres_cluster.create_database("moerge")


@pytest.fixture
def fresh_postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """URL of a new, empty PostgreSQL database for this test only."""
    url = postgres_cluster.create_database()
    yield url
    postgres_cluster.drop_database(str(make_url(url).database))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a new, empty database: once as a SQLite file, once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return str(request.getfixturevalue("fresh_postgres_url"))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 API server (moto's, in its own process) for the whole session."""
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()
