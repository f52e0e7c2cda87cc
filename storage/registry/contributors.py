"""Enrollment tokens and the contributors who join with them.

An admin mints an enrollment (``mge_``) token; :meth:`ContributorsMixin.join` spends one of its
uses to create a contributor and that contributor's first credential, in one transaction.
Revoking a contributor revokes its credentials but leaves its experts as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import uuid4

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from moerge.refusals import AlreadyExists, FailedPrecondition, NotFound, Unauthenticated
from moerge.storage.models import Contributor, Credential, EnrollmentToken, Expert
from moerge.storage.records import ContributorInfo, EnrollmentTokenInfo, Page
from moerge.storage.registry.base import CONTRIBUTOR, MAX_REASON, RegistryBase, utcnow
from moerge.storage.registry.credentials import credential_row
from moerge.storage.registry.helpers import (
    check_actor,
    expiry,
    iso,
    page_oldest_first,
    rows_matched,
    secret_hash,
)
from moerge.storage.tokens import (
    CONTRIBUTOR_PREFIX,
    ENROLLMENT_PREFIX,
    new_token,
    parse_token,
    secret_matches,
)
from moerge.storage.validation import (
    check_contributor_name,
    check_id,
    check_int,
    check_name,
    check_text,
)


class ContributorsMixin(RegistryBase):
    """Invite contributors, let them join, list them and lock them out."""

    def create_enrollment_token(
        self,
        actor: str,
        note: str = "",
        ttl_seconds: float | None = None,
        max_uses: int = 1,
    ) -> tuple[EnrollmentTokenInfo, str]:
        """Invite contributors: the token lets up to ``max_uses`` of them join until it expires."""
        actor = check_actor(actor)
        note = check_text("note", note, MAX_REASON)
        max_uses = check_int("max_uses", max_uses, minimum=1, maximum=1_000_000)
        now = utcnow()
        expires_at = expiry(now, ttl_seconds)
        token_id, token = new_token(ENROLLMENT_PREFIX)
        row = EnrollmentToken(
            id=token_id,
            secret_hash=secret_hash(token),
            note=note,
            created_by=actor,
            created_at=now,
            expires_at=expires_at,
            max_uses=max_uses,
            uses=0,
            revoked_at=None,
        )
        with self._write() as session:
            session.add(row)
            self._audit(
                session,
                actor,
                "enrollment_token.create",
                "enrollment_token",
                token_id,
                {"max_uses": max_uses, "expires_at": iso(expires_at), "note": note},
            )
            info = _enrollment_info(row)
        return info, token

    def get_enrollment_token(self, token_id: str) -> EnrollmentTokenInfo:
        """One enrollment token's record (never its secret); ``NotFound`` for an unknown id."""
        token_id = check_name("token_id", token_id, max_len=16)
        with self._read() as session:
            row = session.get(EnrollmentToken, token_id)
            if row is None:
                raise NotFound(f"enrollment token {token_id!r:.40} not found")
            return _enrollment_info(row)

    def list_enrollment_tokens(
        self, page_size: int = 50, page_token: str | None = None, include_revoked: bool = True
    ) -> Page[EnrollmentTokenInfo]:
        """Enrollment tokens, oldest first (used-up and expired ones included)."""
        conditions = [] if include_revoked else [EnrollmentToken.revoked_at.is_(None)]
        with self._read() as session:
            rows, next_token = page_oldest_first(
                session, EnrollmentToken, "enrollment_tokens", conditions, page_size, page_token
            )
            return Page(tuple(_enrollment_info(row) for row in rows), next_token)

    def revoke_enrollment_token(self, actor: str, token_id: str) -> EnrollmentTokenInfo:
        """Revoke an unused or partly used enrollment token, audited; revoking one twice is
        ``FailedPrecondition``."""
        actor = check_actor(actor)
        token_id = check_name("token_id", token_id, max_len=16)
        with self._write() as session:
            row = session.get(EnrollmentToken, token_id)
            if row is None:
                raise NotFound(f"enrollment token {token_id!r:.40} not found")
            if row.revoked_at is not None:
                raise FailedPrecondition(f"enrollment token {token_id} is already revoked")
            row.revoked_at = utcnow()
            self._audit(session, actor, "enrollment_token.revoke", "enrollment_token", token_id)
            return _enrollment_info(row)

    def join(self, enrollment_token: str, name: str) -> tuple[ContributorInfo, str]:
        """Use an enrollment token to become a contributor; returns the contributor's token."""
        parsed = parse_token(enrollment_token)
        if parsed is None or parsed[0] != ENROLLMENT_PREFIX:
            raise Unauthenticated("not a valid enrollment token")
        _, token_id, secret = parsed
        credential_id, credential_token = new_token(CONTRIBUTOR_PREFIX)

        with self._write() as session:
            now = utcnow()
            row = session.get(EnrollmentToken, token_id)
            if row is None or not secret_matches(secret, row.secret_hash):
                raise Unauthenticated("unknown enrollment token")
            if row.revoked_at is not None:
                raise Unauthenticated("enrollment token has been revoked")
            if row.expires_at is not None and row.expires_at <= now:
                raise Unauthenticated("enrollment token has expired")
            if row.uses >= row.max_uses:
                raise Unauthenticated("enrollment token has been used up")
            checked_name = check_contributor_name("name", name)
            if session.scalar(select(Contributor.id).where(Contributor.name == checked_name)):
                raise AlreadyExists(f"contributor name {checked_name!r} is taken")
            # Conditional increment: two joins racing for the last use cannot both succeed.
            claimed = session.execute(
                update(EnrollmentToken)
                .where(EnrollmentToken.id == token_id, EnrollmentToken.uses < row.max_uses)
                .values(uses=EnrollmentToken.uses + 1)
                .execution_options(synchronize_session=False)
            )
            if rows_matched(claimed) != 1:
                raise Unauthenticated("enrollment token has been used up")
            contributor = Contributor(
                id=uuid4().hex, name=checked_name, created_at=now, revoked_at=None, revoke_reason=""
            )
            session.add(contributor)
            try:
                session.flush()
            except IntegrityError:
                # Another join took the name between our check and our insert (PostgreSQL).
                raise AlreadyExists(f"contributor name {checked_name!r} is taken") from None
            session.add(
                credential_row(credential_id, credential_token, CONTRIBUTOR, contributor.id)
            )
            self._audit(
                session,
                f"enrollment:{token_id}",
                "contributor.join",
                "contributor",
                contributor.id,
                {"name": checked_name, "credential_id": credential_id},
            )
            return _contributor_info(contributor), credential_token

    def get_contributor(self, contributor_id: str) -> ContributorInfo:
        """One contributor's record, revoked or not; ``NotFound`` for an unknown id."""
        contributor_id = check_id("contributor_id", contributor_id)
        with self._read() as session:
            return _contributor_info(get_contributor_row(session, contributor_id))

    def list_contributors(
        self,
        page_size: int = 50,
        page_token: str | None = None,
        include_revoked: bool = True,
    ) -> Page[ContributorInfo]:
        """Contributors, oldest first."""
        conditions: list[ColumnElement[bool]] = []
        if not include_revoked:
            conditions.append(Contributor.revoked_at.is_(None))
        with self._read() as session:
            rows, next_token = page_oldest_first(
                session, Contributor, "contributors", conditions, page_size, page_token
            )
            return Page(tuple(_contributor_info(row) for row in rows), next_token)

    def expert_counts(self, contributor_ids: Sequence[str]) -> dict[str, int]:
        """Experts registered by each contributor (every name, version and state)."""
        ids = [check_id("contributor_id", c) for c in contributor_ids]
        with self._read() as session:
            rows = session.execute(
                select(Expert.contributor_id, func.count())
                .where(Expert.contributor_id.in_(ids))
                .group_by(Expert.contributor_id)
            ).all()
        counts = dict.fromkeys(ids, 0)
        counts.update({contributor: int(count) for contributor, count in rows})
        return counts

    def revoke_contributor(self, actor: str, contributor_id: str, reason: str) -> ContributorInfo:
        """Lock a contributor out: its credentials are revoked; its experts keep their state."""
        actor = check_actor(actor)
        contributor_id = check_id("contributor_id", contributor_id)
        reason = check_text("reason", reason, MAX_REASON)
        with self._write() as session:
            contributor = get_contributor_row(session, contributor_id)
            if contributor.revoked_at is not None:
                raise FailedPrecondition(f"contributor {contributor_id} is already revoked")
            now = utcnow()
            contributor.revoked_at = now
            contributor.revoke_reason = reason
            revoked = session.execute(
                update(Credential)
                .where(Credential.contributor_id == contributor_id, Credential.revoked_at.is_(None))
                .values(revoked_at=now)
                .execution_options(synchronize_session=False)
            )
            self._audit(
                session,
                actor,
                "contributor.revoke",
                "contributor",
                contributor_id,
                {"reason": reason, "credentials_revoked": rows_matched(revoked)},
            )
            return _contributor_info(contributor)


def get_contributor_row(session: Session, contributor_id: str) -> Contributor:
    """The contributor's row in ``session``, or NotFound."""
    contributor = session.get(Contributor, contributor_id)
    if contributor is None:
        raise NotFound(f"contributor {contributor_id} not found")
    return contributor


def _contributor_info(row: Contributor) -> ContributorInfo:
    return ContributorInfo(
        id=row.id,
        name=row.name,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        revoke_reason=row.revoke_reason,
    )


def _enrollment_info(row: EnrollmentToken) -> EnrollmentTokenInfo:
    return EnrollmentTokenInfo(
        id=row.id,
        note=row.note,
        created_by=row.created_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
        max_uses=row.max_uses,
        uses=row.uses,
        revoked_at=row.revoked_at,
    )
