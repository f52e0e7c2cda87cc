"""Alembic environment for the registry schema.

``moerge.storage.db.upgrade`` hands over an open connection in ``config.attributes``; the
``alembic`` command line (``alembic -c storage/alembic.ini upgrade head``) opens one from
``$MOERGE_DATABASE_URL`` or the ini file's ``sqlalchemy.url``.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from moerge.storage.db import for_writing, make_engine
from moerge.storage.models import Base

# Any constant works: it only has to be the same for every coordinator sharing a database.
_MIGRATION_LOCK_ID = 0x6D6F65726765  # "moerge"

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = os.environ.get("MOERGE_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set MOERGE_DATABASE_URL or sqlalchemy.url in alembic.ini")
    return url


def _run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Two coordinators starting at once must not both create the tables.
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
            )
        context.run_migrations()


def run_migrations_offline() -> None:
    """Print the SQL instead of running it (``alembic upgrade head --sql``)."""
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate on the connection ``moerge.storage.db.upgrade`` passed, else on a new engine in one
    write transaction."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = make_engine(_url())
    try:
        with for_writing(engine).begin() as connection:
            _run_on(connection)
    finally:
        engine.dispose()


# Logging is configured from the ini file only on the command line, never inside the coordinator.
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
