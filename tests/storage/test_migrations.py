"""Alembic migrations: from an empty database, idempotent, and in step with the models."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import CheckConstraint, Column, Engine, Integer, MetaData, inspect, text

from moerge.storage.blobstore_local import LocalBlobStore
from moerge.storage.db import alembic_config, current_revision, head_revision, make_engine, upgrade
from moerge.storage.models import Base
from moerge.storage.registry import Registry
from tests.storage.helpers import ADMIN

ALEMBIC_INI = Path(__file__).resolve().parents[2] / "storage" / "alembic.ini"


def schema_differences(engine: Engine, metadata: MetaData) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


def test_upgrade_from_empty_creates_every_table(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        assert upgrade(engine) == head_revision()
        assert current_revision(engine) == head_revision()
        tables = set(inspect(engine).get_table_names())
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_and_keeps_data(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        registry = Registry(engine, LocalBlobStore(tmp_path / "blobs"))
        token = registry.create_admin_credential(ADMIN)
        assert upgrade(engine) == head_revision()
        assert upgrade(engine) == head_revision()
        assert registry.authenticate(token) is not None
    finally:
        engine.dispose()


def _upgrade_when_all_are_ready(barrier: Any, url: str) -> None:
    barrier.wait(timeout=60)
    upgrade(url)


def test_coordinators_starting_together_all_upgrade_the_same_database(db_url: str) -> None:
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    starts = [
        context.Process(target=_upgrade_when_all_are_ready, args=(barrier, db_url))
        for _ in range(3)
    ]
    for process in starts:
        process.start()
    for process in starts:
        process.join(timeout=120)
    assert [process.exitcode for process in starts] == [0, 0, 0]
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_threads_upgrading_at_once_take_turns(db_url: str) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        revisions = list(pool.map(upgrade, [db_url] * 3))
    assert revisions == [head_revision()] * 3


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        assert schema_differences(engine, Base.metadata) == []
        # Autogenerate ignores CHECK constraints, so compare their names explicitly.
        inspector = inspect(engine)
        for table in Base.metadata.sorted_tables:
            expected = {
                str(constraint.name)
                for constraint in table.constraints
                if isinstance(constraint, CheckConstraint)
            }
            found = {check["name"] for check in inspector.get_check_constraints(table.name)}
            assert found == expected, table.name
    finally:
        engine.dispose()


def test_schema_comparison_notices_a_column_the_migrations_lack(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        drifted = MetaData()
        for table in Base.metadata.sorted_tables:
            table.to_metadata(drifted)
        drifted.tables["experts"].append_column(Column("popularity", Integer))
        differences = schema_differences(engine, drifted)
        assert [diff[0] for diff in differences] == ["add_column"]
    finally:
        engine.dispose()


def test_downgrade_to_base_removes_every_table(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_upgrade_accepts_a_url_and_creates_the_sqlite_folder(tmp_path: Path) -> None:
    database = tmp_path / "state" / "nested" / "registry.db"
    assert upgrade(f"sqlite:///{database}") == head_revision()
    assert database.is_file()


def test_upgrade_does_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert upgrade(f"sqlite:///{tmp_path / 'registry.db'}") == head_revision()


def test_alembic_ini_runs_the_migrations_for_developers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "dev.db"
    monkeypatch.setenv("MOERGE_DATABASE_URL", f"sqlite:///{database}")
    monkeypatch.chdir(tmp_path)
    command.upgrade(Config(str(ALEMBIC_INI)), "head")
    engine = make_engine(f"sqlite:///{database}")
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_opening_the_database_waits_out_another_process_lock_beyond_5_s(tmp_path: Path) -> None:
    """A coordinator starting while another one migrates the same SQLite file waits for its
    lock (the busy timeout), also when switching the file to WAL: sqlite3's own 5 s default
    made the third of three coordinators starting together fail under load."""
    path = tmp_path / "registry.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE held (x)")
    holder.execute("BEGIN EXCLUSIVE")  # rollback journal: even the switch to WAL must wait
    release = threading.Timer(6.0, holder.execute, args=("COMMIT",))
    release.start()
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        release.join()
        holder.close()
        engine.dispose()
