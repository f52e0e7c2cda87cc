"""Which replica runs the retraining scheduler and housekeeping: a PostgreSQL advisory lock.

Several coordinator replicas may share one PostgreSQL registry and one object store; each
serves uploads and predictions, but router fits on a schedule, the sweep of orphans and the
clean-up of fits a dead process left must run once. The replica holding the session-level
advisory lock :data:`LOCK_KEY` is the leader. It holds the lock on a connection of its own,
checked every ``check_seconds``; when the process dies, its connection closes and PostgreSQL
releases the lock, and the next replica to try takes it: failover within ``check_seconds``
plus the time the kernel takes to close the dead process's socket (immediately after SIGKILL).
A leader whose connection breaks stops its leader work before anyone else can start it.

On SQLite there is one process by construction: it is the leader from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy import Connection, Engine, text

log = logging.getLogger(__name__)

# "moerge-L" in ASCII; not the migrations' key ("moerge", storage/migrations/env.py), which a
# starting replica takes while the leader holds this one
LOCK_KEY = 0x6D6F657267652D4C


class Leadership:
    """Try to become leader every ``check_seconds``; call ``gained``/``lost`` on changes."""

    def __init__(
        self,
        engine: Engine,
        gained: Callable[[], Awaitable[None]],
        lost: Callable[[], Awaitable[None]],
        check_seconds: float = 1.0,
    ) -> None:
        self.engine = engine
        self.gained = gained
        self.lost = lost
        self.check_seconds = check_seconds
        self.is_leader = False
        self._connection: Connection | None = None

    @property
    def shared(self) -> bool:
        """Whether other processes may share the registry (PostgreSQL) and must elect."""
        return self.engine.dialect.name == "postgresql"

    def _try_acquire(self) -> bool:
        connection = self.engine.connect()
        try:
            got = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY})
            if got.scalar():
                connection.commit()  # end the implicit transaction; the lock is the session's
                self._connection = connection
                return True
            connection.rollback()
        except Exception:
            connection.close()
            raise
        connection.close()
        return False

    def _still_held(self) -> bool:
        assert self._connection is not None
        try:
            self._connection.execute(text("SELECT 1")).scalar()
            self._connection.rollback()
            return True
        except Exception:  # the connection broke: the server has released the lock
            log.warning("lost the leader lock's database connection", exc_info=True)
            with contextlib.suppress(Exception):
                self._connection.invalidate()
            self._connection = None
            return False

    async def run(self) -> None:
        """Until cancelled: become leader when possible; stay one while the lock is held."""
        if not self.shared:
            self.is_leader = True
            await self.gained()
            await asyncio.Event().wait()  # until cancelled
        try:
            while True:
                if not self.is_leader:
                    try:
                        acquired = await asyncio.to_thread(self._try_acquire)
                    except Exception:
                        log.warning("cannot reach the database to elect a leader", exc_info=True)
                        acquired = False
                    if acquired:
                        self.is_leader = True
                        log.info("this replica is the leader (scheduler, housekeeping)")
                        await self.gained()
                elif not await asyncio.to_thread(self._still_held):
                    self.is_leader = False
                    await self.lost()
                await asyncio.sleep(self.check_seconds)
        finally:
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._connection.close)  # releases the lock
                self._connection = None
