"""Opaque page tokens for keyset pagination, so listings stay stable while rows are added.

A token encodes the listing it belongs to and the sort key of the last row returned; the
next page starts strictly after that key. Tokens are not secret: tampering can only move
the starting point of a listing the caller may read anyway.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from moerge.refusals import InvalidArgument
from moerge.storage.validation import fits_column

Key = tuple[datetime | str | int, ...]


def encode_page_token(listing: str, key: Key) -> str:
    """An opaque page token for ``listing`` that resumes after ``key`` (base64 of JSON, datetimes as
    ISO text)."""
    parts = [v.isoformat() if isinstance(v, datetime) else v for v in key]
    raw = json.dumps([listing, *parts], separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_page_token(
    listing: str, token: object, types: tuple[type[datetime] | type[str] | type[int], ...]
) -> Key:
    """Parse a token made by ``encode_page_token`` for ``listing`` whose key has ``types``."""
    malformed = InvalidArgument("page_token", "malformed or from another listing")
    if not isinstance(token, str) or not token or len(token) > 1024:
        raise malformed
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        decoded = json.loads(raw)
    except (binascii.Error, ValueError):
        raise malformed from None
    if not isinstance(decoded, list) or len(decoded) != len(types) + 1 or decoded[0] != listing:
        raise malformed
    key: list[datetime | str | int] = []
    for value, kind in zip(decoded[1:], types, strict=True):
        if kind is datetime:
            try:
                parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
            except ValueError:
                parsed = None
            if parsed is None or parsed.tzinfo is None:
                raise malformed
            key.append(parsed)
        elif isinstance(value, kind) and not isinstance(value, bool) and fits_column(value):
            key.append(value)
        else:
            raise malformed
    return tuple(key)
