"""Engines: SQLite configured for a threaded server, other back ends refused, errors surfaced."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from moerge.storage.blobstore_local import LocalBlobStore
from moerge.storage.db import for_writing, make_engine, upgrade
from moerge.storage.registry import Registry


def test_sqlite_engine_uses_wal_foreign_keys_and_a_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a' / 'b' / 'registry.db'}")
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert connection.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
        assert (tmp_path / "a" / "b").is_dir()
    finally:
        engine.dispose()


def test_sqlite_write_transactions_take_the_write_lock_when_they_begin(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    engine = make_engine(url)
    other = make_engine(url)
    try:
        with for_writing(engine).begin() as writer:
            writer.execute(text("SELECT 1"))  # a read only; the lock is held nonetheless
            with other.connect() as competitor:
                competitor.execute(text("PRAGMA busy_timeout=0"))
                competitor.commit()
                with pytest.raises(OperationalError, match="locked"):
                    competitor.exec_driver_sql("BEGIN IMMEDIATE")
    finally:
        engine.dispose()
        other.dispose()


def test_make_engine_refuses_other_databases() -> None:
    with pytest.raises(ValueError, match="mysql"):
        make_engine("mysql://user@localhost/moerge")


def test_a_lost_database_surfaces_as_operational_error(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port on which nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/moerge?connect_timeout=5")
    try:
        registry = Registry(engine, LocalBlobStore(tmp_path / "blobs"))
        with pytest.raises(OperationalError):
            registry.has_admin_credential()
        with pytest.raises(OperationalError):
            registry.create_admin_credential("admin:test")
    finally:
        engine.dispose()
