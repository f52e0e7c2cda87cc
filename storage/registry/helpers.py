"""Checks and conversions that several of the registry's aggregates share.

Kept apart from :mod:`moerge.storage.registry.base` because none of them needs a transaction:
they validate an argument, shape a value for the audit log or page a query inside a session
the caller already holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, CursorResult, Result, and_, or_, select
from sqlalchemy.orm import Session

from moerge.refusals import InvalidArgument
from moerge.storage.blobstore import BlobRef
from moerge.storage.models import ApiKey, Contributor, EnrollmentToken, Expert
from moerge.storage.pagination import decode_page_token, encode_page_token
from moerge.storage.registry.base import MAX_TEXT
from moerge.storage.tokens import hash_secret, parse_token
from moerge.storage.validation import (
    check_int,
    check_page_size,
    check_seconds,
    check_sha256,
    check_text,
)

# Compared against when a token id is unknown, so that unknown ids take as long as known ones.
DUMMY_HASH = hash_secret("no such credential")
#: Longer lifetimes are cut to this (100 years), so that ``expires_at`` stays a valid date.
MAX_TTL_SECONDS = 100 * 365 * 86400


def check_actor(actor: object) -> str:
    """Who is making a change, as the audit log records it: one non-empty line."""
    text_ = check_text("actor", actor, 256, multiline=False)
    if not text_:
        raise InvalidArgument("actor", "must not be empty")
    return text_


def check_blob_ref(field: str, ref: object) -> BlobRef:
    """A ``(sha256, size)`` pair from a caller, checked and typed as a :class:`BlobRef`."""
    if not isinstance(ref, tuple) or len(ref) != 2:
        raise InvalidArgument(field, "must be a (sha256, size) pair")
    return BlobRef(check_sha256(f"{field}.sha256", ref[0]), check_int(f"{field}.size", ref[1], 0))


def secret_hash(token: str) -> str:
    """What is stored for a token this registry minted: the hash of its secret part only."""
    parsed = parse_token(token)
    assert parsed is not None, "tokens minted here always parse"
    return hash_secret(parsed[2])


def truncate(message: object) -> str:
    """Error messages come from exceptions: keep them, but bounded and printable."""
    text_ = str(message)[:MAX_TEXT]
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text_)


def expiry(now: datetime, ttl_seconds: float | None) -> datetime | None:
    """When a token minted at ``now`` with this lifetime expires (None: never)."""
    if ttl_seconds is None:
        return None
    ttl = check_seconds("ttl_seconds", ttl_seconds, allow_zero=False)
    return now + timedelta(seconds=min(ttl, MAX_TTL_SECONDS))


def iso(value: datetime | None) -> str | None:
    """A timestamp as audit details (JSON) hold it."""
    return None if value is None else value.isoformat()


def rows_matched(result: Result[Any]) -> int:
    """The number of rows an UPDATE matched.

    ``Session.execute`` is typed to return a plain ``Result``; for an UPDATE it is a
    ``CursorResult``, the one that has ``rowcount``.
    """
    assert isinstance(result, CursorResult)
    return result.rowcount


#: The tables listed oldest first: each has an ``id`` and a ``created_at``.
Listed = TypeVar("Listed", Contributor, Expert, ApiKey, EnrollmentToken)


def page_oldest_first(
    session: Session,
    model: type[Listed],
    listing: str,
    conditions: Sequence[ColumnElement[bool]],
    page_size: int,
    page_token: str | None,
) -> tuple[list[Listed], str | None]:
    """Keyset pagination on ``(created_at, id)``: stable while rows are added."""
    page_size = check_page_size(page_size)
    query = select(model).where(*conditions)
    if page_token is not None:
        after_at, after_id = decode_page_token(listing, page_token, (datetime, str))
        query = query.where(
            or_(
                model.created_at > after_at,
                and_(model.created_at == after_at, model.id > after_id),
            )
        )
    rows = list(session.scalars(query.order_by(model.created_at, model.id).limit(page_size + 1)))
    if len(rows) <= page_size:
        return rows, None
    last = rows[page_size - 1]
    return rows[:page_size], encode_page_token(listing, (last.created_at, last.id))
