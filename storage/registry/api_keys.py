"""Users' API keys: the inference-only ``mgu_`` tokens an admin mints, with expiry and a rate limit.

Checking a key is :meth:`ApiKeysMixin._authenticate_api_key`; callers go through
:meth:`~moerge.storage.registry.credentials.CredentialsMixin.authenticate`, which takes every
kind of token and sends the users' keys here.
"""

from __future__ import annotations

from sqlalchemy import update

from moerge.refusals import FailedPrecondition, NotFound
from moerge.storage.models import ApiKey
from moerge.storage.records import ApiKeyInfo, Page, Principal
from moerge.storage.registry.base import (
    LAST_USED_RESOLUTION,
    MAX_REASON,
    USER,
    RegistryBase,
    utcnow,
)
from moerge.storage.registry.helpers import (
    DUMMY_HASH,
    check_actor,
    expiry,
    iso,
    page_oldest_first,
    secret_hash,
)
from moerge.storage.tokens import USER_PREFIX, new_token, secret_matches
from moerge.storage.validation import check_int, check_name, check_text


class ApiKeysMixin(RegistryBase):
    """Mint, list, revoke and check the API keys of the inference-only "user" role."""

    def create_api_key(
        self,
        actor: str,
        note: str = "",
        ttl_seconds: float | None = None,
        rate_limit_per_minute: int | None = None,
    ) -> tuple[ApiKeyInfo, str]:
        """Mint a user's API key; the key itself is returned once and never stored."""
        actor = check_actor(actor)
        note = check_text("note", note, MAX_REASON)
        if rate_limit_per_minute is not None:
            rate_limit_per_minute = check_int(
                "rate_limit_per_minute", rate_limit_per_minute, minimum=1, maximum=1_000_000
            )
        now = utcnow()
        expires_at = expiry(now, ttl_seconds)
        key_id, key = new_token(USER_PREFIX)
        row = ApiKey(
            id=key_id,
            secret_hash=secret_hash(key),
            note=note,
            created_by=actor,
            created_at=now,
            expires_at=expires_at,
            rate_limit_per_minute=rate_limit_per_minute,
            revoked_at=None,
            last_used_at=None,
        )
        with self._write() as session:
            session.add(row)
            self._audit(
                session,
                actor,
                "api_key.create",
                "api_key",
                key_id,
                {
                    "expires_at": iso(expires_at),
                    "rate_limit_per_minute": rate_limit_per_minute,
                    "note": note,
                },
            )
            info = _api_key_info(row)
        return info, key

    def list_api_keys(
        self, page_size: int = 50, page_token: str | None = None, include_revoked: bool = True
    ) -> Page[ApiKeyInfo]:
        """API keys, oldest first (expired ones included: their ``expires_at`` says so)."""
        conditions = [] if include_revoked else [ApiKey.revoked_at.is_(None)]
        with self._read() as session:
            rows, next_token = page_oldest_first(
                session, ApiKey, "api_keys", conditions, page_size, page_token
            )
            return Page(tuple(_api_key_info(row) for row in rows), next_token)

    def revoke_api_key(self, actor: str, key_id: str) -> ApiKeyInfo:
        """Stop a key from authenticating; the next request with it is UNAUTHENTICATED."""
        actor = check_actor(actor)
        key_id = check_name("key_id", key_id, max_len=16)
        with self._write() as session:
            row = session.get(ApiKey, key_id)
            if row is None:
                raise NotFound(f"API key {key_id!r:.40} not found")
            if row.revoked_at is not None:
                raise FailedPrecondition(f"API key {key_id} is already revoked")
            row.revoked_at = utcnow()
            self._audit(session, actor, "api_key.revoke", "api_key", key_id)
            return _api_key_info(row)

    def _authenticate_api_key(self, key_id: str, secret: str) -> Principal | None:
        """The user a key belongs to, or None if it is unknown, revoked or expired."""
        now = utcnow()
        with self._read() as session:
            row = session.get(ApiKey, key_id)
            matches = secret_matches(secret, row.secret_hash if row else DUMMY_HASH)
            if (
                row is None
                or not matches
                or row.revoked_at is not None
                or (row.expires_at is not None and row.expires_at <= now)
            ):
                return None
            principal = Principal(
                role=USER,
                contributor_id=None,
                credential_id=row.id,
                rate_limit_per_minute=row.rate_limit_per_minute,
                expires_at=row.expires_at,
            )
            last_used = row.last_used_at
        if last_used is None or now - last_used >= LAST_USED_RESOLUTION:
            with self._write() as session:
                session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now))
        return principal


def _api_key_info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=row.id,
        note=row.note,
        created_by=row.created_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
        rate_limit_per_minute=row.rate_limit_per_minute,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )
