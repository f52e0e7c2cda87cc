"""The registry's tables, as SQLAlchemy models portable across SQLite and PostgreSQL.

Only the registry (``registry/``, ``compositions.py``), the migrations and the metrics gauges
(``coordinator/interceptors/metrics.py``) use these; the rest of the coordinator sees records.
Every change here needs a new Alembic revision in ``migrations/versions/`` (a test compares
the migrated schema with these models).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Explicit constraint names keep the schema identical on both back ends and let later
# migrations drop or alter constraints by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID = String(32)  # uuid4().hex
TOKEN_ID = String(16)
SHA256 = String(64)
NAME = String(128)
ACTOR = String(256)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes in and out; SQLite keeps no zone, so it is restored here."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive datetimes and store UTC; SQLite has no time zones, so it gets the naive UTC
        value."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: the registry stores timezone-aware UTC times")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Hand back an aware UTC datetime whatever the database returned (SQLite's are naive)."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of the registry's tables; the naming convention gives constraints stable
    names that Alembic migrations can refer to."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Contributor(Base):
    """Someone who uploads experts; joined with an enrollment token."""

    __tablename__ = "contributors"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(NAME, unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoke_reason: Mapped[str] = mapped_column(Text)


class Credential(Base):
    """An API token: only the hash of its secret is stored, keyed by its token id."""

    __tablename__ = "credentials"
    __table_args__ = (
        CheckConstraint(
            "(role = 'admin' AND contributor_id IS NULL)"
            " OR (role = 'contributor' AND contributor_id IS NOT NULL)",
            name="role_owner",
        ),
    )

    id: Mapped[str] = mapped_column(TOKEN_ID, primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    contributor_id: Mapped[str | None] = mapped_column(
        ID, ForeignKey("contributors.id"), index=True
    )
    secret_hash: Mapped[str] = mapped_column(SHA256)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class NodeKey(Base):
    """A contributor's Flower SuperNode public key (OpenSSH text). The coordinator's SuperLink
    admits the nodes of these keys while their contributor is not revoked; the id is the
    SHA-256 of the key's text, so one key belongs to one contributor."""

    __tablename__ = "node_keys"

    id: Mapped[str] = mapped_column(SHA256, primary_key=True)
    contributor_id: Mapped[str] = mapped_column(ID, ForeignKey("contributors.id"), index=True)
    public_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class EnrollmentToken(Base):
    """A one-time (or few-times) invitation that lets a new contributor join."""

    __tablename__ = "enrollment_tokens"
    __table_args__ = (CheckConstraint("uses >= 0 AND uses <= max_uses", name="uses"),)

    id: Mapped[str] = mapped_column(TOKEN_ID, primary_key=True)
    secret_hash: Mapped[str] = mapped_column(SHA256)
    note: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(ACTOR)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class ApiKey(Base):
    """An inference-only credential of the "user" role; only the hash of its secret is kept."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(TOKEN_ID, primary_key=True)
    secret_hash: Mapped[str] = mapped_column(SHA256)
    note: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(ACTOR)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Expert(Base):
    """One version of a contributor's LoRA expert; its files live in the blob store."""

    __tablename__ = "experts"
    __table_args__ = (
        UniqueConstraint("contributor_id", "name", "version"),
        CheckConstraint("state IN ('active', 'quarantined', 'retired')", name="state"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    contributor_id: Mapped[str] = mapped_column(ID, ForeignKey("contributors.id"))
    name: Mapped[str] = mapped_column(NAME)
    version: Mapped[int] = mapped_column(Integer)
    task_name: Mapped[str] = mapped_column(NAME, index=True)
    task_description: Mapped[str] = mapped_column(Text)
    task_type: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    state_reason: Mapped[str] = mapped_column(Text)
    base_model_id: Mapped[str] = mapped_column(String(256))
    lora_rank: Mapped[int] = mapped_column(Integer)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    label_names: Mapped[list[str]] = mapped_column(JSON)
    example_count: Mapped[int] = mapped_column(BigInteger)
    content_sha256: Mapped[str] = mapped_column(SHA256)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)

    files: Mapped[list[ExpertFile]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )
    statistics: Mapped[ExpertStatistics] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )


class ExpertFile(Base):
    """One file of an expert, e.g. ``adapter_model.safetensors``, by digest."""

    __tablename__ = "expert_files"

    expert_id: Mapped[str] = mapped_column(
        ID, ForeignKey("experts.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(NAME, primary_key=True)
    sha256: Mapped[str] = mapped_column(SHA256, index=True)
    size: Mapped[int] = mapped_column(BigInteger)


class ExpertStatistics(Base):
    """The scalar summary statistics of an expert, so routers can be chosen without blobs."""

    __tablename__ = "expert_statistics"

    expert_id: Mapped[str] = mapped_column(
        ID, ForeignKey("experts.id", ondelete="CASCADE"), primary_key=True
    )
    hidden_size: Mapped[int] = mapped_column(Integer)
    covariance_rank: Mapped[int] = mapped_column(Integer)
    dp: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    gate_modules: Mapped[int] = mapped_column(Integer)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)


class Upload(Base):
    """A resumable upload of one expert, keyed by the id the contributor chose."""

    __tablename__ = "uploads"
    __table_args__ = (
        CheckConstraint("state IN ('receiving', 'committed', 'failed')", name="state"),
        CheckConstraint("received_bytes >= 0 AND received_bytes <= total_bytes", name="bytes"),
    )

    contributor_id: Mapped[str] = mapped_column(ID, ForeignKey("contributors.id"), primary_key=True)
    upload_id: Mapped[str] = mapped_column(NAME, primary_key=True)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    received_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str] = mapped_column(Text)
    expert_id: Mapped[str | None] = mapped_column(ID, ForeignKey("experts.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class RouterVersion(Base):
    """One router training run and, once ready, its artifact in the blob store."""

    __tablename__ = "router_versions"
    __table_args__ = (
        CheckConstraint("status IN ('training', 'ready', 'failed')", name="status"),
        CheckConstraint("status = 'ready' OR NOT active", name="active_is_ready"),
        # At most one active version, enforced by the database even under concurrent writers.
        Index(
            "ix_router_versions_one_active",
            "active",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    method: Mapped[str] = mapped_column(String(64), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean)
    expert_ids: Mapped[list[str]] = mapped_column(JSON)
    artifact_sha256: Mapped[str | None] = mapped_column(SHA256)
    artifact_size: Mapped[int | None] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str] = mapped_column(Text)
    trigger: Mapped[str] = mapped_column(String(32))
    created_by: Mapped[str] = mapped_column(ACTOR)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    fit_seconds: Mapped[float | None] = mapped_column(Float)


class AuditEntry(Base):
    """Who changed what and when; written in the same transaction as the change itself."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    actor: Mapped[str] = mapped_column(ACTOR)
    action: Mapped[str] = mapped_column(String(64), index=True)
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(200), index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)


class Composition(Base):
    """One version of a named few-shot composition: signed merge weights over experts.

    ``examples`` holds the labelled examples the weights were searched on only when the user
    asked to keep them (``None`` otherwise: they were used for the search and dropped).
    """

    __tablename__ = "compositions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(NAME, index=True)
    version: Mapped[int] = mapped_column(Integer)
    expert_ids: Mapped[list[str]] = mapped_column(JSON)
    weights: Mapped[list[float]] = mapped_column(JSON)
    label_names: Mapped[list[str]] = mapped_column(JSON)
    search: Mapped[dict[str, Any]] = mapped_column(JSON)  # config, loss, evaluations, seconds
    examples: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(ACTOR)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class RateBucket(Base):
    """One token bucket of the rate limits that replicas on PostgreSQL share
    (``coordinator/interceptors/shared_limits.py``); SQLite keeps its buckets in memory.
    ``updated`` is the database's clock (epoch seconds), so the replicas' clocks do not matter;
    ``granted`` is what the last draw lent its replica."""

    __tablename__ = "rate_buckets"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    granted: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
