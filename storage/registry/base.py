"""What every part of the registry stands on: its sessions, its audit writer and its constants.

:class:`RegistryBase` owns the engine, the blob store and the two session factories. Each
aggregate (``credentials``, ``experts``, ``routers``...) is a mixin over it that opens one short
transaction per public method with :meth:`RegistryBase._read` or :meth:`RegistryBase._write`,
and :class:`moerge.storage.registry.Registry` puts the mixins together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Final

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from moerge.refusals import FailedPrecondition
from moerge.storage.blobstore import BlobRef, BlobStore
from moerge.storage.db import for_writing
from moerge.storage.models import AuditEntry
from moerge.storage.records import NewExpert

# Final: each is its own Literal, so it passes where a records.Role is expected.
ADMIN: Final = "admin"
CONTRIBUTOR: Final = "contributor"
USER: Final = "user"
SYSTEM_ACTOR = "system"

#: ``last_used_at`` is refreshed at most this often, so authentication is mostly read-only.
LAST_USED_RESOLUTION = timedelta(seconds=60)

MAX_TEXT = 4096
MAX_REASON = 1024


def utcnow() -> datetime:
    """The registry's clock: timezone-aware UTC, as every timestamp column stores it."""
    return datetime.now(timezone.utc)


class RegistryBase:
    """Transactions, the write counter and the audit writer that every aggregate mixin shares.

    ``engine`` should come from :func:`moerge.storage.db.make_engine` (it configures SQLite
    for concurrent use) and have been migrated with :func:`moerge.storage.db.upgrade`.
    """

    def __init__(self, engine: Engine, blobs: BlobStore) -> None:
        self._engine = engine
        self._blobs = blobs
        self._read_sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(for_writing(engine), expire_on_commit=False)
        #: Set by the coordinator: why a new expert must start quarantined ("" = admit it).
        #: Called before the registering transaction, so it may read the registry.
        self.admission: Callable[[str, NewExpert], str] | None = None
        self._writes = 0  # see :meth:`generation`

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._read_sessions() as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        try:
            with self._write_sessions() as session, session.begin():
                yield session
        finally:
            self._writes += 1  # after the commit (or rollback): see :meth:`generation`

    def generation(self) -> int:
        """Changes after every write transaction of this ``Registry``, committed or not.

        Request-path caches (:mod:`moerge.coordinator.services.registry_cache`) remember the
        generation they read under and drop what they hold once it moves, so a revoke or a
        quarantine made through this object is seen by the very next request. It counts after the
        commit: read it *before* the value you remember, and a write that commits in between moves
        it.
        """
        return self._writes

    @staticmethod
    def _audit(
        session: Session,
        actor: str,
        action: str,
        target_type: str,
        target_id: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        session.add(
            AuditEntry(
                at=utcnow(),
                actor=actor,
                action=action,
                target_type=target_type,
                target_id=target_id,
                details=dict(details or {}),
            )
        )

    def _require_blob(self, what: str, ref: BlobRef) -> None:
        """Refuse a row that would point to a blob the store lacks or holds at another size."""
        size = self._blobs.size(ref.sha256)
        if size is None:
            raise FailedPrecondition(f"{what}: blob {ref.sha256} is not in the blob store")
        if size != ref.size:
            raise FailedPrecondition(
                f"{what}: blob {ref.sha256} has {size} bytes, not the declared {ref.size}"
            )
