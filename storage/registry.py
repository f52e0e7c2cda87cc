"""The expert registry: the one object the coordinator uses to read and change persistent state.

Each method runs in its own short transaction (a new session per call), so one ``Registry``
can be shared by all of the coordinator's threads. A method that changes state writes its
audit entry in the same transaction; a method that refuses a call raises a
``RegistryError`` and leaves the database as it was. Database failures are not wrapped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, cast
from uuid import uuid4

from sqlalchemy import ColumnElement, Engine, and_, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from moerge.storage.blobstore import BlobRef, BlobStore, GcResult
from moerge.storage.db import for_writing
from moerge.storage.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from moerge.storage.models import (
    ApiKey,
    AuditEntry,
    Contributor,
    Credential,
    EnrollmentToken,
    Expert,
    ExpertFile,
    ExpertStatistics,
    RouterVersion,
    Upload,
)
from moerge.storage.pagination import decode_page_token, encode_page_token
from moerge.storage.records import (
    EXPERT_STATES,
    ApiKeyInfo,
    AuditEntryInfo,
    ContributorInfo,
    EnrollmentTokenInfo,
    ExpertInfo,
    ExpertState,
    NewExpert,
    Page,
    Principal,
    RouterStatus,
    RouterVersionInfo,
    StatisticsSummary,
    UploadInfo,
    UploadState,
    content_digest,
)
from moerge.storage.tokens import (
    ADMIN_PREFIX,
    CONTRIBUTOR_PREFIX,
    ENROLLMENT_PREFIX,
    USER_PREFIX,
    hash_secret,
    new_token,
    parse_token,
    secret_matches,
)
from moerge.storage.validation import (
    check_contributor_name,
    check_id,
    check_int,
    check_json_object,
    check_name,
    check_page_size,
    check_seconds,
    check_sha256,
    check_string_list,
    check_text,
)

ADMIN = "admin"
CONTRIBUTOR = "contributor"
USER = "user"
SYSTEM_ACTOR = "system"
_ROLE_BY_PREFIX = {ADMIN_PREFIX: ADMIN, CONTRIBUTOR_PREFIX: CONTRIBUTOR}

#: ``last_used_at`` is refreshed at most this often, so authentication is mostly read-only.
LAST_USED_RESOLUTION = timedelta(seconds=60)

MAX_TEXT = 4096
MAX_REASON = 1024
#: The audit log's actor for experts quarantined by the admission hook (consistency checks).
ADMISSION_ACTOR = "system:consistency"
MAX_LIST_ITEMS = 4096
MAX_FILES = 64
# Compared against when a token id is unknown, so that unknown ids take as long as known ones.
_DUMMY_HASH = hash_secret("no such credential")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Registry:
    """Contributors, credentials, experts, uploads, router versions and the audit log.

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

    # -- transactions ---------------------------------------------------------------------

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

        Request-path caches (:mod:`moerge.coordinator.registry_cache`) remember the generation
        they read under and drop what they hold once it moves, so a revoke or a quarantine made
        through this object is seen by the very next request. It counts after the commit: read
        it *before* the value you remember, and a write that commits in between moves it.
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

    # -- credentials ----------------------------------------------------------------------

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
        actor = _check_actor(actor)
        token_id, token = new_token(ADMIN_PREFIX)
        with self._write() as session:
            session.add(_credential(token_id, token, ADMIN, None))
            self._audit(
                session, actor, "credential.create", "credential", token_id, {"role": ADMIN}
            )
        return token

    def import_admin_token(self, token: str, actor: str) -> str:
        """Accept an operator-chosen admin token (e.g. from an environment variable).

        Idempotent: importing the same token again changes nothing, and a token revoked
        since stays revoked. Returns its credential id.
        """
        actor = _check_actor(actor)
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
            session.add(_credential(token_id, token, ADMIN, None))
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
            matches = secret_matches(secret, credential.secret_hash if credential else _DUMMY_HASH)
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
        actor = _check_actor(actor)
        credential_id = check_name("credential_id", credential_id, max_len=16)
        with self._write() as session:
            credential = session.get(Credential, credential_id)
            if credential is None:
                raise NotFound(f"credential {credential_id!r:.40} not found")
            if credential.revoked_at is not None:
                raise FailedPrecondition(f"credential {credential_id} is already revoked")
            credential.revoked_at = utcnow()
            self._audit(session, actor, "credential.revoke", "credential", credential_id)

    # -- user API keys (inference only) ---------------------------------------------------

    def create_api_key(
        self,
        actor: str,
        note: str = "",
        ttl_seconds: float | None = None,
        rate_limit_per_minute: int | None = None,
    ) -> tuple[ApiKeyInfo, str]:
        """Mint a user's API key; the key itself is returned once and never stored."""
        actor = _check_actor(actor)
        note = check_text("note", note, MAX_REASON)
        if rate_limit_per_minute is not None:
            rate_limit_per_minute = check_int(
                "rate_limit_per_minute", rate_limit_per_minute, minimum=1, maximum=1_000_000
            )
        now = utcnow()
        expires_at = None
        if ttl_seconds is not None:
            ttl = check_seconds("ttl_seconds", ttl_seconds, allow_zero=False)
            expires_at = now + timedelta(seconds=min(ttl, 100 * 365 * 86400))
        key_id, key = new_token(USER_PREFIX)
        row = ApiKey(
            id=key_id,
            secret_hash=_secret_hash(key),
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
                {"expires_at": _iso(expires_at), "rate_limit_per_minute": rate_limit_per_minute,
                 "note": note},
            )
            info = _api_key_info(row)
        return info, key

    def list_api_keys(
        self, page_size: int = 50, page_token: str | None = None, include_revoked: bool = True
    ) -> Page[ApiKeyInfo]:
        """API keys, oldest first (expired ones included: their ``expires_at`` says so)."""
        conditions = [] if include_revoked else [ApiKey.revoked_at.is_(None)]
        with self._read() as session:
            rows, next_token = _page_oldest_first(
                session, ApiKey, "api_keys", conditions, page_size, page_token
            )
            return Page(tuple(_api_key_info(row) for row in rows), next_token)

    def revoke_api_key(self, actor: str, key_id: str) -> ApiKeyInfo:
        """Stop a key from authenticating; the next request with it is UNAUTHENTICATED."""
        actor = _check_actor(actor)
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
        now = utcnow()
        with self._read() as session:
            row = session.get(ApiKey, key_id)
            matches = secret_matches(secret, row.secret_hash if row else _DUMMY_HASH)
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

    # -- enrollment and contributors ------------------------------------------------------

    def create_enrollment_token(
        self,
        actor: str,
        note: str = "",
        ttl_seconds: float | None = None,
        max_uses: int = 1,
    ) -> tuple[EnrollmentTokenInfo, str]:
        """Invite contributors: the token lets up to ``max_uses`` of them join until it expires."""
        actor = _check_actor(actor)
        note = check_text("note", note, MAX_REASON)
        max_uses = check_int("max_uses", max_uses, minimum=1, maximum=1_000_000)
        now = utcnow()
        expires_at = None
        if ttl_seconds is not None:
            ttl = check_seconds("ttl_seconds", ttl_seconds, allow_zero=False)
            expires_at = now + timedelta(seconds=min(ttl, 100 * 365 * 86400))
        token_id, token = new_token(ENROLLMENT_PREFIX)
        row = EnrollmentToken(
            id=token_id,
            secret_hash=_secret_hash(token),
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
                {"max_uses": max_uses, "expires_at": _iso(expires_at), "note": note},
            )
            info = _enrollment_info(row)
        return info, token

    def get_enrollment_token(self, token_id: str) -> EnrollmentTokenInfo:
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
            rows, next_token = _page_oldest_first(
                session, EnrollmentToken, "enrollment_tokens", conditions, page_size, page_token
            )
            return Page(tuple(_enrollment_info(row) for row in rows), next_token)

    def revoke_enrollment_token(self, actor: str, token_id: str) -> EnrollmentTokenInfo:
        actor = _check_actor(actor)
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
            if claimed.rowcount != 1:
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
            session.add(_credential(credential_id, credential_token, CONTRIBUTOR, contributor.id))
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
        contributor_id = check_id("contributor_id", contributor_id)
        with self._read() as session:
            return _contributor_info(_get_contributor(session, contributor_id))

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
            rows, next_token = _page_oldest_first(
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
        actor = _check_actor(actor)
        contributor_id = check_id("contributor_id", contributor_id)
        reason = check_text("reason", reason, MAX_REASON)
        with self._write() as session:
            contributor = _get_contributor(session, contributor_id)
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
                {"reason": reason, "credentials_revoked": revoked.rowcount},
            )
            return _contributor_info(contributor)

    # -- experts --------------------------------------------------------------------------

    def register_expert(
        self, actor: str, contributor_id: str, spec: NewExpert
    ) -> tuple[ExpertInfo, bool]:
        """Record an expert whose files are already in the blob store.

        Idempotent: if this contributor has an expert with the same content (under any name),
        that expert is returned with ``created=False``; otherwise the next version of the name
        is created (quarantined if another contributor's identical expert is not active).
        """
        actor = _check_actor(actor)
        contributor_id = check_id("contributor_id", contributor_id)
        _check_new_expert(spec)
        quarantine = self._admission_reason(contributor_id, spec)
        with self._write() as session:
            return self._register(session, actor, contributor_id, spec, quarantine)

    def _admission_reason(self, contributor_id: str, spec: NewExpert) -> str:
        if self.admission is None:
            return ""
        return _truncate(self.admission(contributor_id, spec))[:MAX_REASON]

    def _register(
        self,
        session: Session,
        actor: str,
        contributor_id: str,
        spec: NewExpert,
        quarantine: str = "",
    ) -> tuple[ExpertInfo, bool]:
        """Insert the expert; with a ``quarantine`` reason it starts quarantined, not active."""
        # The row lock serialises registrations by one contributor on PostgreSQL, so two
        # concurrent uploads cannot both pick the same next version (SQLite: BEGIN IMMEDIATE).
        contributor = session.get(Contributor, contributor_id, with_for_update=True)
        if contributor is None:
            raise NotFound(f"contributor {contributor_id} not found")
        if contributor.revoked_at is not None:
            raise PermissionDenied(f"contributor {contributor_id} has been revoked")
        digest = content_digest(spec.files)
        # Identical content is registered once per contributor, whatever its name: a new name
        # must not multiply a contributor's share of routing, nor bring back an expert an
        # admin quarantined. The same name is preferred, then the oldest.
        same = session.scalar(
            select(Expert)
            .where(Expert.contributor_id == contributor_id, Expert.content_sha256 == digest)
            .order_by(Expert.name != spec.name, Expert.created_at, Expert.version)
            .limit(1)
        )
        if same is not None:
            return _expert_info(same), False
        if not quarantine:  # another contributor's copy of an expert taken out of routing
            withdrawn = session.scalar(
                select(Expert.id)
                .where(Expert.content_sha256 == digest, Expert.state != "active")
                .limit(1)
            )
            if withdrawn is not None:
                quarantine = f"identical content to expert {withdrawn}, which is not active"
        latest = session.scalar(
            select(func.max(Expert.version)).where(
                Expert.contributor_id == contributor_id, Expert.name == spec.name
            )
        )
        now = utcnow()
        stats = spec.statistics
        expert = Expert(
            id=uuid4().hex,
            contributor_id=contributor_id,
            name=spec.name,
            version=(latest or 0) + 1,
            task_name=spec.task_name,
            task_description=spec.task_description,
            task_type=spec.task_type,
            state="quarantined" if quarantine else "active",
            state_reason=quarantine,
            base_model_id=spec.base_model_id,
            lora_rank=spec.lora_rank,
            target_modules=list(spec.target_modules),
            label_names=list(spec.label_names),
            example_count=spec.example_count,
            content_sha256=digest,
            created_at=now,
            updated_at=now,
            files=[
                ExpertFile(name=name, sha256=ref[0], size=ref[1])
                for name, ref in sorted(spec.files.items())
            ],
            statistics=ExpertStatistics(
                hidden_size=stats.hidden_size,
                covariance_rank=stats.covariance_rank,
                dp=None if stats.dp is None else check_json_object("statistics.dp", stats.dp),
                gate_modules=stats.gate_modules,
                summary=check_json_object("statistics.summary", stats.summary),
            ),
        )
        session.add(expert)
        session.flush()
        # Checked after the insert: on PostgreSQL, blob garbage collection locks expert_files,
        # so a blob seen here cannot be collected before this transaction commits.
        for name, ref in sorted(spec.files.items()):
            self._require_blob(f"files[{name!r}]", BlobRef(ref[0], ref[1]))
        self._audit(
            session,
            actor,
            "expert.register",
            "expert",
            expert.id,
            {
                "contributor_id": contributor_id,
                "name": spec.name,
                "version": expert.version,
                "content_sha256": digest,
            },
        )
        if quarantine:
            self._audit(
                session,
                ADMISSION_ACTOR,
                "expert.set_state",
                "expert",
                expert.id,
                {"from": "new", "to": "quarantined", "reason": quarantine},
            )
        return _expert_info(expert), True

    def _require_blob(self, what: str, ref: BlobRef) -> None:
        size = self._blobs.size(ref.sha256)
        if size is None:
            raise FailedPrecondition(f"{what}: blob {ref.sha256} is not in the blob store")
        if size != ref.size:
            raise FailedPrecondition(
                f"{what}: blob {ref.sha256} has {size} bytes, not the declared {ref.size}"
            )

    def get_expert(self, expert_id: str) -> ExpertInfo:
        expert_id = check_id("expert_id", expert_id)
        with self._read() as session:
            return _expert_info(_get_expert(session, expert_id))

    def list_experts(
        self,
        page_size: int = 50,
        page_token: str | None = None,
        state: str | None = None,
        contributor_id: str | None = None,
        task_name: str | None = None,
    ) -> Page[ExpertInfo]:
        """Experts, oldest first, optionally filtered."""
        conditions: list[ColumnElement[bool]] = []
        if state is not None:
            conditions.append(Expert.state == _check_state(state))
        if contributor_id is not None:
            conditions.append(Expert.contributor_id == check_id("contributor_id", contributor_id))
        if task_name is not None:
            conditions.append(Expert.task_name == check_name("task_name", task_name))
        with self._read() as session:
            rows, next_token = _page_oldest_first(
                session, Expert, "experts", conditions, page_size, page_token
            )
            return Page(tuple(_expert_info(row) for row in rows), next_token)

    def active_experts(self) -> list[ExpertInfo]:
        """All active experts, oldest first: what routers are trained on."""
        with self._read() as session:
            rows = session.scalars(
                select(Expert)
                .where(Expert.state == "active")
                .order_by(Expert.created_at, Expert.id)
            )
            return [_expert_info(row) for row in rows]

    def expert_set_fingerprint(self) -> str:
        """SHA-256 over the sorted ids of active experts; changes when a router is outdated."""
        with self._read() as session:
            ids = sorted(session.scalars(select(Expert.id).where(Expert.state == "active")))
        return hashlib.sha256("\n".join(ids).encode("ascii")).hexdigest()

    def set_expert_state(
        self, actor: str, expert_id: str, state: str, reason: str = ""
    ) -> ExpertInfo:
        """Quarantine, retire or re-activate an expert."""
        actor = _check_actor(actor)
        expert_id = check_id("expert_id", expert_id)
        state = _check_state(state)
        reason = check_text("reason", reason, MAX_REASON)
        with self._write() as session:
            expert = _get_expert(session, expert_id)
            previous = expert.state
            expert.state = state
            expert.state_reason = reason
            expert.updated_at = utcnow()
            self._audit(
                session,
                actor,
                "expert.set_state",
                "expert",
                expert_id,
                {"from": previous, "to": state, "reason": reason},
            )
            return _expert_info(expert)

    def delete_expert(self, actor: str, expert_id: str) -> GcResult:
        """Delete an expert, then its blobs unless another expert or a router still uses them."""
        actor = _check_actor(actor)
        expert_id = check_id("expert_id", expert_id)
        with self._write() as session:
            expert = _get_expert(session, expert_id)
            candidates = {file.sha256 for file in expert.files}
            self._audit(
                session,
                actor,
                "expert.delete",
                "expert",
                expert_id,
                {
                    "contributor_id": expert.contributor_id,
                    "name": expert.name,
                    "version": expert.version,
                },
            )
            session.delete(expert)
        return self._collect_garbage(candidates)

    def _collect_garbage(self, candidates: set[str]) -> GcResult:
        """Delete those of ``candidates`` that no expert file or router artifact references."""
        removed: list[str] = []
        freed = 0
        if not candidates:
            return GcResult(0, 0)
        with self._write() as session:
            if self._engine.dialect.name == "postgresql":
                # Conflicts with the lock every insert or update of these tables takes, so no
                # registration can start using a candidate between the check and the unlink.
                session.execute(
                    text("LOCK TABLE expert_files, router_versions IN SHARE ROW EXCLUSIVE MODE")
                )
            referenced = set(
                session.scalars(
                    select(ExpertFile.sha256).where(ExpertFile.sha256.in_(sorted(candidates)))
                )
            ) | set(
                session.scalars(
                    select(RouterVersion.artifact_sha256).where(
                        RouterVersion.artifact_sha256.in_(sorted(candidates))
                    )
                )
            )
            for sha256 in sorted(candidates - referenced):
                size = self._blobs.delete(sha256)
                removed.append(sha256)
                freed += size
        return GcResult(len(removed), freed, tuple(removed))

    def referenced_blobs(self) -> set[str]:
        """Every blob an expert or router version uses: the set to keep in ``BlobStore.gc``."""
        with self._read() as session:
            files = set(session.scalars(select(ExpertFile.sha256)))
            artifacts = session.scalars(
                select(RouterVersion.artifact_sha256).where(
                    RouterVersion.artifact_sha256.is_not(None)
                )
            )
            return files | {sha for sha in artifacts if sha is not None}

    # -- uploads --------------------------------------------------------------------------

    def begin_upload(
        self,
        contributor_id: str,
        upload_id: str,
        manifest: dict[str, Any],
        total_bytes: int,
    ) -> UploadInfo:
        """Start an upload, or find it again to resume it.

        The same id with the same manifest returns the existing upload as it is (receiving,
        failed with its error, or committed with its ``expert_id``); with a different
        manifest it is refused.
        """
        contributor_id = check_id("contributor_id", contributor_id)
        upload_id = check_name("upload_id", upload_id)
        manifest = check_json_object("manifest", manifest)
        total_bytes = check_int("total_bytes", total_bytes, minimum=0)
        actor = f"{CONTRIBUTOR}:{contributor_id}"
        with self._write() as session:
            contributor = _get_contributor(session, contributor_id)
            if contributor.revoked_at is not None:
                raise PermissionDenied(f"contributor {contributor_id} has been revoked")
            upload = session.get(Upload, (contributor_id, upload_id))
            now = utcnow()
            if upload is not None:
                if upload.manifest != manifest or upload.total_bytes != total_bytes:
                    raise FailedPrecondition(
                        f"upload {upload_id!r} exists with a different manifest; use a new id"
                    )
                return _upload_info(upload)
            upload = Upload(
                contributor_id=contributor_id,
                upload_id=upload_id,
                manifest=manifest,
                total_bytes=total_bytes,
                received_bytes=0,
                state="receiving",
                error="",
                expert_id=None,
                created_at=now,
                updated_at=now,
            )
            session.add(upload)
            self._audit(
                session,
                actor,
                "upload.begin",
                "upload",
                _upload_target(contributor_id, upload_id),
                {"total_bytes": total_bytes},
            )
            return _upload_info(upload)

    def get_upload(self, contributor_id: str, upload_id: str) -> UploadInfo:
        with self._read() as session:
            return _upload_info(_get_upload(session, contributor_id, upload_id))

    def set_upload_progress(
        self, contributor_id: str, upload_id: str, received_bytes: int
    ) -> UploadInfo:
        """Record how much has arrived, for resuming. Bookkeeping only: not audited."""
        with self._write() as session:
            upload = _get_upload(session, contributor_id, upload_id)
            if upload.state != "receiving":
                raise FailedPrecondition(f"upload {upload_id!r} is {upload.state}, not receiving")
            upload.received_bytes = check_int(
                "received_bytes", received_bytes, minimum=0, maximum=upload.total_bytes
            )
            upload.updated_at = utcnow()
            return _upload_info(upload)

    def fail_upload(self, contributor_id: str, upload_id: str, error: str) -> UploadInfo:
        """Mark an upload refused; beginning it again returns it failed, with ``error``."""
        with self._write() as session:
            upload = _get_upload(session, contributor_id, upload_id)
            if upload.state == "committed":
                raise FailedPrecondition(f"upload {upload_id!r} is already committed")
            upload.state = "failed"
            upload.error = _truncate(error)
            upload.updated_at = utcnow()
            self._audit(
                session,
                SYSTEM_ACTOR,
                "upload.fail",
                "upload",
                _upload_target(contributor_id, upload_id),
                {"error": upload.error},
            )
            return _upload_info(upload)

    def commit_upload(
        self, actor: str, contributor_id: str, upload_id: str, spec: NewExpert
    ) -> tuple[ExpertInfo, bool]:
        """Register the uploaded expert and mark the upload committed, in one transaction.

        Committing again returns the expert registered the first time (``created=False``).
        """
        actor = _check_actor(actor)
        _check_new_expert(spec)
        quarantine = self._admission_reason(contributor_id, spec)
        with self._write() as session:
            upload = _get_upload(session, contributor_id, upload_id)
            if upload.state == "committed":
                expert = session.get(Expert, upload.expert_id) if upload.expert_id else None
                if expert is None:
                    raise FailedPrecondition(
                        f"upload {upload_id!r} was committed but its expert has been deleted"
                    )
                return _expert_info(expert), False
            if upload.state != "receiving":
                raise FailedPrecondition(f"upload {upload_id!r} is {upload.state}, not receiving")
            info, created = self._register(session, actor, contributor_id, spec, quarantine)
            upload.state = "committed"
            upload.expert_id = info.id
            upload.received_bytes = upload.total_bytes
            upload.updated_at = utcnow()
            self._audit(
                session,
                actor,
                "upload.commit",
                "upload",
                _upload_target(contributor_id, upload_id),
                {"expert_id": info.id, "created": created},
            )
            return info, created

    def stale_uploads(self, older_than_seconds: float) -> list[UploadInfo]:
        """Unfinished (receiving or failed) uploads untouched for this long, oldest first."""
        age = check_seconds("older_than_seconds", older_than_seconds)
        cutoff = utcnow() - timedelta(seconds=age)
        with self._read() as session:
            rows = session.scalars(
                select(Upload)
                .where(Upload.state.in_(("receiving", "failed")), Upload.updated_at <= cutoff)
                .order_by(Upload.updated_at, Upload.contributor_id, Upload.upload_id)
            )
            return [_upload_info(row) for row in rows]

    def delete_upload(self, actor: str, contributor_id: str, upload_id: str) -> None:
        """Forget an upload (its expert, if committed, stays)."""
        actor = _check_actor(actor)
        with self._write() as session:
            upload = _get_upload(session, contributor_id, upload_id)
            self._audit(
                session,
                actor,
                "upload.delete",
                "upload",
                _upload_target(contributor_id, upload_id),
                {"contributor_id": contributor_id, "state": upload.state},
            )
            session.delete(upload)

    # -- router versions ------------------------------------------------------------------

    def create_router_version(
        self,
        actor: str,
        method: str,
        params: dict[str, Any],
        expert_ids: list[str],
        trigger: str,
    ) -> RouterVersionInfo:
        """Record that a router is being trained (status 'training')."""
        actor = _check_actor(actor)
        method = check_name("method", method, max_len=64)
        params = check_json_object("params", params)
        trigger = check_name("trigger", trigger, max_len=32)
        if not isinstance(expert_ids, (list, tuple)):
            raise InvalidArgument("expert_ids", "must be a list of expert ids")
        ids = [check_id(f"expert_ids[{i}]", expert_id) for i, expert_id in enumerate(expert_ids)]
        with self._write() as session:
            row = RouterVersion(
                method=method,
                params=params,
                status="training",
                active=False,
                expert_ids=ids,
                artifact_sha256=None,
                artifact_size=None,
                metrics={},
                error="",
                trigger=trigger,
                created_by=actor,
                created_at=utcnow(),
                finished_at=None,
                fit_seconds=None,
            )
            session.add(row)
            session.flush()
            self._audit(
                session,
                actor,
                "router.create",
                "router_version",
                str(row.version),
                {"method": method, "trigger": trigger, "experts": len(ids)},
            )
            return _router_info(row)

    def complete_router_version(
        self,
        version: int,
        artifact: BlobRef | tuple[str, int],
        metrics: dict[str, Any],
        fit_seconds: float,
        activate: bool = True,
    ) -> RouterVersionInfo:
        """Mark a trained router ready; with ``activate`` it becomes the only active one."""
        version = check_int("version", version, minimum=1)
        ref = _check_blob_ref("artifact", artifact)
        metrics = check_json_object("metrics", metrics)
        fit = check_seconds("fit_seconds", fit_seconds)

        with self._write() as session:
            self._lock_router_versions(session)
            row = _get_router_version(session, version)
            if row.status != "training":
                raise FailedPrecondition(f"router version {version} is {row.status}, not training")
            row.status = "ready"
            row.artifact_sha256 = ref.sha256
            row.artifact_size = ref.size
            row.metrics = metrics
            row.fit_seconds = fit
            row.finished_at = utcnow()
            session.flush()
            self._require_blob("artifact", ref)  # after the update, as in _register
            self._audit(
                session,
                SYSTEM_ACTOR,
                "router.complete",
                "router_version",
                str(version),
                {"artifact_sha256": ref.sha256, "fit_seconds": fit},
            )
            if activate:
                self._activate(session, row, SYSTEM_ACTOR)
            return _router_info(row)

    def fail_router_version(self, version: int, error: str) -> RouterVersionInfo:
        version = check_int("version", version, minimum=1)
        with self._write() as session:
            row = _get_router_version(session, version)
            if row.status != "training":
                raise FailedPrecondition(f"router version {version} is {row.status}, not training")
            row.status = "failed"
            row.error = _truncate(error)
            row.finished_at = utcnow()
            self._audit(
                session,
                SYSTEM_ACTOR,
                "router.fail",
                "router_version",
                str(version),
                {"error": row.error},
            )
            return _router_info(row)

    def activate_router_version(self, actor: str, version: int) -> RouterVersionInfo:
        """Serve this (ready) version from now on, e.g. to roll back."""
        actor = _check_actor(actor)
        version = check_int("version", version, minimum=1)

        with self._write() as session:
            self._lock_router_versions(session)
            row = _get_router_version(session, version)
            if row.status != "ready":
                raise FailedPrecondition(f"router version {version} is {row.status}, not ready")
            if not row.active:
                self._activate(session, row, actor)
            return _router_info(row)

    def _lock_router_versions(self, session: Session) -> None:
        """Serialise activations on PostgreSQL, as BEGIN IMMEDIATE does on SQLite.

        Without it, two concurrent activations each see no other active version and the
        loser fails on the one-active index instead of waiting its turn.
        """
        if self._engine.dialect.name == "postgresql":
            session.execute(text("LOCK TABLE router_versions IN SHARE ROW EXCLUSIVE MODE"))

    def _activate(self, session: Session, row: RouterVersion, actor: str) -> None:
        previous = session.scalar(
            select(RouterVersion.version).where(RouterVersion.active.is_(True))
        )
        session.execute(
            update(RouterVersion)
            .where(RouterVersion.active.is_(True), RouterVersion.version != row.version)
            .values(active=False)
            .execution_options(synchronize_session=False)
        )
        row.active = True
        session.flush()
        self._audit(
            session,
            actor,
            "router.activate",
            "router_version",
            str(row.version),
            {"previous": previous},
        )

    def active_router_version(self) -> RouterVersionInfo | None:
        with self._read() as session:
            row = session.scalar(select(RouterVersion).where(RouterVersion.active.is_(True)))
            return None if row is None else _router_info(row)

    def get_router_version(self, version: int) -> RouterVersionInfo:
        version = check_int("version", version, minimum=1)
        with self._read() as session:
            return _router_info(_get_router_version(session, version))

    def list_router_versions(
        self,
        page_size: int = 50,
        page_token: str | None = None,
        method: str | None = None,
    ) -> Page[RouterVersionInfo]:
        """Router versions, newest first."""
        page_size = check_page_size(page_size)
        query = select(RouterVersion)
        if method is not None:
            query = query.where(RouterVersion.method == check_name("method", method, max_len=64))
        if page_token is not None:
            (after,) = decode_page_token("router_versions", page_token, (int,))
            query = query.where(RouterVersion.version < after)
        query = query.order_by(RouterVersion.version.desc()).limit(page_size + 1)
        with self._read() as session:
            rows = list(session.scalars(query))
            items = tuple(_router_info(row) for row in rows[:page_size])
        next_token = (
            encode_page_token("router_versions", (items[-1].version,))
            if len(rows) > page_size
            else None
        )
        return Page(items, next_token)

    def fail_interrupted_router_versions(self) -> list[int]:
        """Mark versions left 'training' by a crash as failed; called once at start."""
        with self._write() as session:
            rows = list(
                session.scalars(
                    select(RouterVersion)
                    .where(RouterVersion.status == "training")
                    .order_by(RouterVersion.version)
                )
            )
            now = utcnow()
            for row in rows:
                row.status = "failed"
                row.error = "interrupted: the coordinator stopped while this router was training"
                row.finished_at = now
                self._audit(
                    session,
                    SYSTEM_ACTOR,
                    "router.fail",
                    "router_version",
                    str(row.version),
                    {"error": row.error},
                )
            return [row.version for row in rows]

    # -- audit ----------------------------------------------------------------------------

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


# -- helpers ------------------------------------------------------------------------------


def _check_actor(actor: object) -> str:
    text_ = check_text("actor", actor, 256, multiline=False)
    if not text_:
        raise InvalidArgument("actor", "must not be empty")
    return text_


def _check_state(state: object) -> str:
    if state not in EXPERT_STATES:
        raise InvalidArgument("state", f"must be one of {', '.join(EXPERT_STATES)}")
    return str(state)


def _check_blob_ref(field: str, ref: object) -> BlobRef:
    if not isinstance(ref, tuple) or len(ref) != 2:
        raise InvalidArgument(field, "must be a (sha256, size) pair")
    return BlobRef(check_sha256(f"{field}.sha256", ref[0]), check_int(f"{field}.size", ref[1], 0))


def _check_new_expert(spec: object) -> None:
    """Refuse a malformed ``NewExpert`` before the transaction starts."""
    if not isinstance(spec, NewExpert):
        raise InvalidArgument("spec", "must be a NewExpert")
    check_name("name", spec.name)
    check_name("task_name", spec.task_name)
    check_text("task_description", spec.task_description, MAX_TEXT)
    check_name("task_type", spec.task_type, max_len=32)
    check_text("base_model_id", spec.base_model_id, 256, multiline=False)
    check_int("lora_rank", spec.lora_rank, minimum=1, maximum=1 << 20)
    check_string_list("target_modules", spec.target_modules, MAX_LIST_ITEMS, 256)
    check_string_list("label_names", spec.label_names, MAX_LIST_ITEMS, 256)
    check_int("example_count", spec.example_count, minimum=0)  # 0: adapter-only expert
    if not isinstance(spec.files, Mapping) or not spec.files:
        raise InvalidArgument("files", "must name at least one file")
    if len(spec.files) > MAX_FILES:
        raise InvalidArgument("files", f"must name at most {MAX_FILES} files")
    for name, ref in spec.files.items():
        check_name("files", name)
        _check_blob_ref(f"files[{name!r}]", ref)
    stats = spec.statistics
    if not isinstance(stats, StatisticsSummary):
        raise InvalidArgument("statistics", "must be a StatisticsSummary")
    check_int("statistics.hidden_size", stats.hidden_size, minimum=1)
    check_int("statistics.covariance_rank", stats.covariance_rank, minimum=0)
    check_int("statistics.gate_modules", stats.gate_modules, minimum=0)
    if stats.dp is not None:
        check_json_object("statistics.dp", stats.dp)
    check_json_object("statistics.summary", stats.summary)


def _credential(token_id: str, token: str, role: str, contributor_id: str | None) -> Credential:
    return Credential(
        id=token_id,
        role=role,
        contributor_id=contributor_id,
        secret_hash=_secret_hash(token),
        created_at=utcnow(),
        revoked_at=None,
        last_used_at=None,
    )


def _secret_hash(token: str) -> str:
    parsed = parse_token(token)
    assert parsed is not None, "tokens minted here always parse"
    return hash_secret(parsed[2])


def _truncate(message: object) -> str:
    """Error messages come from exceptions: keep them, but bounded and printable."""
    text_ = str(message)[:MAX_TEXT]
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text_)


def _upload_target(contributor_id: str, upload_id: str) -> str:
    """Upload ids are chosen by contributors, so the audit target includes the contributor."""
    return f"{contributor_id}:{upload_id}"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _page_oldest_first(
    session: Session,
    model: type[Contributor] | type[Expert] | type[ApiKey] | type[EnrollmentToken],
    listing: str,
    conditions: list[ColumnElement[bool]],
    page_size: int,
    page_token: str | None,
) -> tuple[list[Any], str | None]:
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


def _get_contributor(session: Session, contributor_id: str) -> Contributor:
    contributor = session.get(Contributor, contributor_id)
    if contributor is None:
        raise NotFound(f"contributor {contributor_id} not found")
    return contributor


def _get_expert(session: Session, expert_id: str) -> Expert:
    expert = session.get(Expert, expert_id)
    if expert is None:
        raise NotFound(f"expert {expert_id} not found")
    return expert


def _get_upload(session: Session, contributor_id: str, upload_id: str) -> Upload:
    contributor_id = check_id("contributor_id", contributor_id)
    upload_id = check_name("upload_id", upload_id)
    upload = session.get(Upload, (contributor_id, upload_id))
    if upload is None:
        raise NotFound(f"upload {upload_id!r} of contributor {contributor_id} not found")
    return upload


def _get_router_version(session: Session, version: int) -> RouterVersion:
    row = session.get(RouterVersion, version)
    if row is None:
        raise NotFound(f"router version {version} not found")
    return row


def _contributor_info(row: Contributor) -> ContributorInfo:
    return ContributorInfo(
        id=row.id,
        name=row.name,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        revoke_reason=row.revoke_reason,
    )


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


def _expert_info(row: Expert) -> ExpertInfo:
    stats = row.statistics
    return ExpertInfo(
        id=row.id,
        contributor_id=row.contributor_id,
        name=row.name,
        version=row.version,
        task_name=row.task_name,
        task_description=row.task_description,
        task_type=row.task_type,
        state=cast(ExpertState, row.state),
        state_reason=row.state_reason,
        base_model_id=row.base_model_id,
        lora_rank=row.lora_rank,
        target_modules=tuple(row.target_modules),
        label_names=tuple(row.label_names),
        example_count=row.example_count,
        content_sha256=row.content_sha256,
        files={file.name: BlobRef(file.sha256, file.size) for file in row.files},
        statistics=StatisticsSummary(
            hidden_size=stats.hidden_size,
            covariance_rank=stats.covariance_rank,
            gate_modules=stats.gate_modules,
            dp=stats.dp,
            summary=stats.summary,
        ),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _upload_info(row: Upload) -> UploadInfo:
    return UploadInfo(
        contributor_id=row.contributor_id,
        upload_id=row.upload_id,
        manifest=row.manifest,
        total_bytes=row.total_bytes,
        received_bytes=row.received_bytes,
        state=cast(UploadState, row.state),
        error=row.error,
        expert_id=row.expert_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _router_info(row: RouterVersion) -> RouterVersionInfo:
    return RouterVersionInfo(
        version=row.version,
        method=row.method,
        params=row.params,
        status=cast(RouterStatus, row.status),
        active=row.active,
        expert_ids=tuple(row.expert_ids),
        artifact_sha256=row.artifact_sha256,
        artifact_size=row.artifact_size,
        metrics=row.metrics,
        error=row.error,
        trigger=row.trigger,
        created_by=row.created_by,
        created_at=row.created_at,
        finished_at=row.finished_at,
        fit_seconds=row.fit_seconds,
    )


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
