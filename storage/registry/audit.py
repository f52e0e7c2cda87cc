"""Reading the audit log.

Entries are written by :meth:`~moerge.storage.registry.base.RegistryBase._audit` inside the
transaction of the change they record, so this module only reads them.
"""

from __future__ import annotations

from sqlalchemy import select

from moerge.storage.models import AuditEntry
from moerge.storage.pagination import decode_page_token, encode_page_token
from moerge.storage.records import AuditEntryInfo, Page
from moerge.storage.registry.base import RegistryBase
from moerge.storage.validation import check_name, check_page_size


class AuditMixin(RegistryBase):
    """Page through the audit log, filtered by action or target."""

    def list_audit(
        self,
        page_size: int = 100,
        page_token: str | None = None,
        action: str | None = None,
        target_id: str | None = None,
    ) -> Page[AuditEntryInfo]:
        """The audit log, newest first."""
        page_size = check_page_size(page_size)
        query = select(AuditEntry)
        if action is not None:
            query = query.where(AuditEntry.action == check_name("action", action, max_len=64))
        if target_id is not None:
            query = query.where(AuditEntry.target_id == check_name("target_id", target_id))
        if page_token is not None:
            (after,) = decode_page_token("audit", page_token, (int,))
            query = query.where(AuditEntry.id < after)
        query = query.order_by(AuditEntry.id.desc()).limit(page_size + 1)
        with self._read() as session:
            rows = list(session.scalars(query))
            items = tuple(_audit_info(row) for row in rows[:page_size])
        next_token = encode_page_token("audit", (items[-1].id,)) if len(rows) > page_size else None
        return Page(items, next_token)


def _audit_info(row: AuditEntry) -> AuditEntryInfo:
    return AuditEntryInfo(
        id=row.id,
        at=row.at,
        actor=row.actor,
        action=row.action,
        target_type=row.target_type,
        target_id=row.target_id,
        details=row.details,
    )
