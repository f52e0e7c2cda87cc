"""Results of the AdminService calls: router versions, contributors, enrollment tokens, API
keys, deletions and the audit log."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from moerge.results.base import Result, scalars, utc_time
from moerge.v1 import admin_pb2


@dataclasses.dataclass(frozen=True)
class RouterVersion(Result):
    """A fitted (or failed) router: method, the experts it routes among, its metrics."""

    version: int
    method: str
    status: str  # "training", "ready" or "failed"
    active: bool
    params_json: str
    expert_ids: tuple[str, ...]
    artifact_sha256: str
    artifact_size: int
    metrics: dict[str, float]
    error: str
    trigger: str  # "manual", "expert_change", "periodic", ...
    created_at: datetime | None
    fit_seconds: float

    @classmethod
    def from_proto(cls, m: admin_pb2.RouterVersion) -> RouterVersion:
        """The result of the protobuf message ``m``."""
        return scalars(
            cls,
            m,
            expert_ids=tuple(m.expert_ids),
            metrics=dict(m.metrics),
            created_at=utc_time(m.created_at),
        )


@dataclasses.dataclass(frozen=True)
class Contributor(Result):
    """A contributor as admins see it (never its credential)."""

    contributor_id: str
    name: str
    created_at: datetime | None
    revoked: bool
    revoke_reason: str
    expert_count: int

    @classmethod
    def from_proto(cls, m: admin_pb2.Contributor) -> Contributor:
        """The result of the protobuf message ``m``."""
        return scalars(cls, m, created_at=utc_time(m.created_at))


@dataclasses.dataclass(frozen=True)
class EnrollmentToken(Result):
    """A new enrollment token; its secret is shown only here."""

    token_id: str
    token: str  # shown once
    expires_at: datetime | None  # None: never
    max_uses: int

    @classmethod
    def from_proto(cls, m: admin_pb2.CreateEnrollmentTokenResponse) -> EnrollmentToken:
        """The result of the protobuf message ``m``."""
        return scalars(cls, m, expires_at=utc_time(m.expires_at))


@dataclasses.dataclass(frozen=True)
class EnrollmentTokenInfo(Result):
    """An enrollment token as ``admin tokens list`` shows it (its secret is never shown again)."""

    token_id: str
    note: str
    created_by: str
    created_at: datetime | None
    expires_at: datetime | None  # None: never
    max_uses: int
    uses: int
    revoked: bool

    @classmethod
    def from_proto(cls, m: admin_pb2.EnrollmentToken) -> EnrollmentTokenInfo:
        """The result of the protobuf message ``m``."""
        return scalars(cls, m, created_at=utc_time(m.created_at), expires_at=utc_time(m.expires_at))


@dataclasses.dataclass(frozen=True)
class ApiKey(Result):
    """A user's inference-only API key (its secret is shown once, by :class:`CreatedApiKey`)."""

    key_id: str
    note: str
    created_by: str
    created_at: datetime | None
    expires_at: datetime | None  # None: never
    rate_limit_per_minute: int  # 0: the coordinator's inference_requests_per_minute
    revoked: bool
    last_used_at: datetime | None

    @classmethod
    def from_proto(cls, m: admin_pb2.ApiKey) -> ApiKey:
        """The result of the protobuf message ``m``."""
        return scalars(
            cls,
            m,
            created_at=utc_time(m.created_at),
            expires_at=utc_time(m.expires_at),
            last_used_at=utc_time(m.last_used_at),
        )


@dataclasses.dataclass(frozen=True)
class CreatedApiKey(Result):
    """A new API key; its secret is shown only here."""

    key: ApiKey
    api_key: str  # shown once: pass it as the token (Authorization: Bearer) of inference calls

    @classmethod
    def from_proto(cls, m: admin_pb2.CreateApiKeyResponse) -> CreatedApiKey:
        """The result of the protobuf message ``m``."""
        return cls(key=ApiKey.from_proto(m.key), api_key=m.api_key)


@dataclasses.dataclass(frozen=True)
class DeletedExpert(Result):
    """What deleting an expert freed in the blob store."""

    blobs_removed: int
    bytes_freed: int


@dataclasses.dataclass(frozen=True)
class AuditEntry(Result):
    """One line of the audit log: who did what to which target."""

    id: int
    at: datetime | None
    actor: str
    action: str
    target_type: str
    target_id: str
    details_json: str

    @classmethod
    def from_proto(cls, m: admin_pb2.AuditEntry) -> AuditEntry:
        """The result of the protobuf message ``m``."""
        return scalars(cls, m, at=utc_time(m.at))
