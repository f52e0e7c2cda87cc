"""Fixtures for storage tests: a migrated registry on each database, with its blob store.

Registry tests start from a copy of a database migrated once per session (a SQLite file, a
PostgreSQL template database); the migration tests themselves use the empty ``db_url``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from moerge.storage.blobstore import BlobStore
from moerge.storage.blobstore_local import LocalBlobStore
from moerge.storage.db import make_engine, upgrade
from moerge.storage.registry import Registry
from tests.postgres import PostgresCluster
from tests.storage.helpers import ADMIN


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "registry.db"
    upgrade(f"sqlite:///{path}")  # disposes its engine, which folds the WAL into the file
    return path


@pytest.fixture(scope="session")
def postgres_template(postgres_cluster: PostgresCluster) -> str:
    url = postgres_cluster.create_database("registry_template")
    upgrade(url)
    return str(make_url(url).database)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def migrated_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a new database already at the newest revision: once SQLite, once PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "registry.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    url = cluster.create_database(template=request.getfixturevalue("postgres_template"))
    yield url
    cluster.drop_database(str(make_url(url).database))


@pytest.fixture
def engine(migrated_db_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture
def registry(engine: Engine, blobs: BlobStore) -> Registry:
    return Registry(engine, blobs)


@pytest.fixture
def contributor_id(registry: Registry) -> str:
    """Id of a contributor who joined with a fresh enrollment token."""
    _, token = registry.create_enrollment_token(ADMIN)
    info, _ = registry.join(token, "alice")
    return info.id
