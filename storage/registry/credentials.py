"""Admin and contributor credentials, and :meth:`~CredentialsMixin.authenticate` for every token.

A credential is the stored half of a ``mga_``/``mgc_`` token: its id and the hash of its secret,
never the token itself. Contributors' credentials are minted by ``join``
(:mod:`moerge.storage.registry.contributors`); admin ones here. ``authenticate`` takes every
kind of token, so it builds on :class:`~moerge.storage.registry.api_keys.ApiKeysMixin` for the
users' keys.
"""

from __future__ import annotations

from sqlalchemy import or_, select, update

from moerge.refusals import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from moerge.storage.models import Contributor, Credential
from moerge.storage.records import Principal
from moerge.storage.registry.api_keys import ApiKeysMixin
from moerge.storage.registry.base import ADMIN, CONTRIBUTOR, LAST_USED_RESOLUTION, utcnow
from moerge.storage.registry.helpers import DUMMY_HASH, check_actor, secret_hash
from moerge.storage.tokens import (
    ADMIN_PREFIX,
    CONTRIBUTOR_PREFIX,
    USER_PREFIX,
    new_token,
    parse_token,
    secret_matches,
)
from moerge.storage.validation import check_name

_ROLE_BY_PREFIX = {ADMIN_PREFIX: ADMIN, CONTRIBUTOR_PREFIX: CONTRIBUTOR}


class CredentialsMixin(ApiKeysMixin):
    """Mint, import, check and revoke the credentials of admins and contributors."""

    def has_admin_credential(self) -> bool:
        """Whether any admin credential can still log in (else the coordinator bootstraps one)."""
        with self._read() as session:
            found = session.scalar(
                select(Credential.id)
                .where(Credential.role == ADMIN, Credential.revoked_at.is_(None))
                .limit(1)
            )
        return found is not None

    def create_admin_credential(self, actor: str) -> str:
        """Mint an admin token; the token itself is returned once and never stored."""
        actor = check_actor(actor)
        token_id, token = new_token(ADMIN_PREFIX)
        with self._write() as session:
            session.add(credential_row(token_id, token, ADMIN, None))
            self._audit(
                session, actor, "credential.create", "credential", token_id, {"role": ADMIN}
            )
        return token

    def import_admin_token(self, token: str, actor: str) -> str:
        """Accept an operator-chosen admin token (e.g. from an environment variable).

        Idempotent: importing the same token again changes nothing, and a token revoked
        since stays revoked. Returns its credential id.
        """
        actor = check_actor(actor)
        parsed = parse_token(token)
        if parsed is None or parsed[0] != ADMIN_PREFIX:
            raise InvalidArgument(
                "token", "not an admin token (expected mga_<16 hex>_<32+ url-safe characters>)"
            )
        _, token_id, secret = parsed
        with self._write() as session:
            existing = session.get(Credential, token_id)
            if existing is not None:
                if existing.role != ADMIN or not secret_matches(secret, existing.secret_hash):
                    raise AlreadyExists(f"credential {token_id} exists with a different secret")
                return token_id
            session.add(credential_row(token_id, token, ADMIN, None))
            self._audit(
                session, actor, "credential.import", "credential", token_id, {"role": ADMIN}
            )
        return token_id

    def authenticate(self, token: str) -> Principal | None:
        """Who ``token`` belongs to, or None if it is malformed, unknown or revoked."""
        parsed = parse_token(token)
        if parsed is not None and parsed[0] == USER_PREFIX:
            return self._authenticate_api_key(parsed[1], parsed[2])
        if parsed is None or parsed[0] not in _ROLE_BY_PREFIX:
            return None
        prefix, token_id, secret = parsed
        with self._read() as session:
            credential = session.get(Credential, token_id)
            matches = secret_matches(secret, credential.secret_hash if credential else DUMMY_HASH)
            if (
                credential is None
                or not matches
                or credential.role != _ROLE_BY_PREFIX[prefix]
                or credential.revoked_at is not None
            ):
                return None
            if credential.contributor_id is not None:
                owner = session.get(Contributor, credential.contributor_id)
                if owner is None or owner.revoked_at is not None:
                    return None
            principal = Principal(
                role=ADMIN if credential.role == ADMIN else CONTRIBUTOR,
                contributor_id=credential.contributor_id,
                credential_id=credential.id,
            )
            last_used = credential.last_used_at
        now = utcnow()
        if last_used is None or now - last_used >= LAST_USED_RESOLUTION:
            with self._write() as session:
                session.execute(
                    update(Credential)
                    .where(
                        Credential.id == token_id,
                        or_(
                            Credential.last_used_at.is_(None),
                            Credential.last_used_at <= now - LAST_USED_RESOLUTION,
                        ),
                    )
                    .values(last_used_at=now)
                )
        return principal

    def revoke_credential(self, actor: str, credential_id: str) -> None:
        """Stop one token from authenticating (admin or contributor)."""
        actor = check_actor(actor)
        credential_id = check_name("credential_id", credential_id, max_len=16)
        with self._write() as session:
            credential = session.get(Credential, credential_id)
            if credential is None:
                raise NotFound(f"credential {credential_id!r:.40} not found")
            if credential.revoked_at is not None:
                raise FailedPrecondition(f"credential {credential_id} is already revoked")
            credential.revoked_at = utcnow()
            self._audit(session, actor, "credential.revoke", "credential", credential_id)


def credential_row(token_id: str, token: str, role: str, contributor_id: str | None) -> Credential:
    """The row for a token just minted or imported: only its secret's hash is kept."""
    return Credential(
        id=token_id,
        role=role,
        contributor_id=contributor_id,
        secret_hash=secret_hash(token),
        created_at=utcnow(),
        revoked_at=None,
        last_used_at=None,
    )
