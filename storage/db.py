"""Opening the database and bringing its schema up to date, for SQLite and PostgreSQL alike.

SQLite is configured for a multi-threaded server: WAL (readers never block the writer),
foreign keys on, a busy timeout, and transactions that SQLAlchemy begins itself so that
a write transaction can take the write lock up front (``BEGIN IMMEDIATE``) instead of
failing half way with "database is locked".
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.url import URL

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000

# Alembic keeps the running migration in module globals: one upgrade per process at a time.
# Across processes, SQLite's write lock and a PostgreSQL advisory lock (env.py) take over.
_UPGRADE_LOCK = threading.Lock()

# Execution option read by the SQLite ``begin`` hook; see ``for_writing``.
_SQLITE_BEGIN_OPTION = "moerge_sqlite_begin"


def make_engine(url: str) -> Engine:
    """An engine for ``sqlite:///path`` (parent folder created) or ``postgresql+psycopg://``."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _make_sqlite_engine(parsed)
    if backend == "postgresql":
        # Connections dropped by a server restart are replaced instead of failing a request.
        return create_engine(parsed, pool_pre_ping=True)
    raise ValueError(f"unsupported database {backend!r}: use sqlite or postgresql")


def for_writing(engine: Engine) -> Engine:
    """The same engine, but SQLite transactions start with ``BEGIN IMMEDIATE``.

    Read-then-write transactions then wait for the write lock (up to the busy timeout) at
    their start, rather than failing at their first write when another writer got in first.
    PostgreSQL ignores the option.
    """
    return engine.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})


def _make_sqlite_engine(url: URL) -> Engine:
    database = url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Stop the sqlite3 module from issuing BEGIN on its own; _on_sqlite_begin does it.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # The busy timeout first: switching to WAL waits for another process's write lock (a
        # coordinator migrating the same file), and would otherwise give up after sqlite3's
        # default 5 s with "database is locked".
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # SQLite may refuse a journal-mode change at once, without its busy handler, while
        # another process holds a lock (seen with three coordinators starting together): retry
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _on_sqlite_begin(connection: Connection) -> None:
    mode = connection.get_execution_options().get(_SQLITE_BEGIN_OPTION, "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")


def alembic_config() -> Config:
    """Alembic configuration that finds the migrations wherever the package is installed."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str | None:
    """The newest revision shipped with this code."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade(engine_or_url: Engine | str) -> str | None:
    """Migrate the schema to the newest revision; a no-op when it is already there.

    Runs in one transaction (on PostgreSQL; SQLite DDL is transactional here too), so a
    failed migration leaves the previous schema. Returns the revision now in place.
    """
    owned = isinstance(engine_or_url, str)
    engine = make_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    try:
        # IMMEDIATE on SQLite: two processes upgrading at once take turns instead of failing.
        with _UPGRADE_LOCK, for_writing(engine).begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        return current_revision(engine)
    finally:
        if owned:
            engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for a database never migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
