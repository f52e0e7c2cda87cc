"""Plain, immutable records that the registry returns and accepts.

The coordinator never sees ORM objects: these records are detached from any session, safe to
pass between threads, and say exactly which fields the registry promises.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from moerge.storage.blobstore import BlobRef

Role = Literal["admin", "contributor", "user"]
ExpertState = Literal["active", "quarantined", "retired"]
UploadState = Literal["receiving", "committed", "failed"]
RouterStatus = Literal["training", "ready", "failed"]

ROLES: tuple[str, ...] = ("admin", "contributor")
EXPERT_STATES: tuple[str, ...] = ("active", "quarantined", "retired")
UPLOAD_STATES: tuple[str, ...] = ("receiving", "committed", "failed")
ROUTER_STATUSES: tuple[str, ...] = ("training", "ready", "failed")

T = TypeVar("T")


def content_digest(files: Mapping[str, BlobRef | tuple[str, int]]) -> str:
    """SHA-256 over the sorted ``name:sha256`` lines: equal for equal expert content."""
    lines = sorted(f"{name}:{ref[0]}" for name, ref in files.items())
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; pass ``next_page_token`` back for the next (None: last page)."""

    items: tuple[T, ...]
    next_page_token: str | None


@dataclass(frozen=True)
class Principal:
    """Who a credential belongs to: an admin, or a contributor (then ``contributor_id`` is set)."""

    role: Role
    contributor_id: str | None
    credential_id: str
    #: A user API key's own limit on inference requests per minute (None: the coordinator's)
    rate_limit_per_minute: int | None = None
    #: When a user API key stops working; checked on every call, even one served from a cache
    expires_at: datetime | None = None


@dataclass(frozen=True)
class ContributorInfo:
    """A contributor; ``revoked_at`` is set once an admin has locked it out."""

    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None
    revoke_reason: str


@dataclass(frozen=True)
class NodeKeyInfo:
    """A contributor's Flower SuperNode public key; ``id`` is the SHA-256 of its OpenSSH text."""

    id: str
    contributor_id: str
    public_key: str
    created_at: datetime


@dataclass(frozen=True)
class EnrollmentTokenInfo:
    """An invitation to join, without its secret (which is shown only when it is created)."""

    id: str
    note: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    max_uses: int
    uses: int
    revoked_at: datetime | None


@dataclass(frozen=True)
class ApiKeyInfo:
    """A user's inference-only API key, without its secret (shown only when it is created)."""

    id: str
    note: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    rate_limit_per_minute: int | None  # None: the coordinator's default
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True)
class StatisticsSummary:
    """The scalar part of an expert's summary statistics (tensors stay in the blob store)."""

    hidden_size: int
    covariance_rank: int
    gate_modules: int
    dp: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NewExpert:
    """What a contributor submits; ``files`` name blobs that must already be in the store."""

    name: str
    task_name: str
    task_type: str
    base_model_id: str
    lora_rank: int
    target_modules: tuple[str, ...] | list[str]
    label_names: tuple[str, ...] | list[str]
    example_count: int
    files: Mapping[str, BlobRef | tuple[str, int]]
    statistics: StatisticsSummary
    task_description: str = ""

    @property
    def content_sha256(self) -> str:
        """The digest of the expert's files taken together: two uploads of the same files have the
        same one."""
        return content_digest(self.files)


@dataclass(frozen=True)
class ExpertInfo:
    """One version of an expert; ``files`` maps file names to blobs in the blob store."""

    id: str
    contributor_id: str
    name: str
    version: int
    task_name: str
    task_description: str
    task_type: str
    state: ExpertState
    state_reason: str
    base_model_id: str
    lora_rank: int
    target_modules: tuple[str, ...]
    label_names: tuple[str, ...]
    example_count: int
    content_sha256: str
    files: dict[str, BlobRef]
    statistics: StatisticsSummary
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class UploadInfo:
    """A resumable upload; ``expert_id`` is set once it is committed."""

    contributor_id: str
    upload_id: str
    manifest: dict[str, Any]
    total_bytes: int
    received_bytes: int
    state: UploadState
    error: str
    expert_id: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class RouterVersionInfo:
    """One router training run; the artifact fields are set once it is ready."""

    version: int
    method: str
    params: dict[str, Any]
    status: RouterStatus
    active: bool
    expert_ids: tuple[str, ...]
    artifact_sha256: str | None
    artifact_size: int | None
    metrics: dict[str, Any]
    error: str
    trigger: str
    created_by: str
    created_at: datetime
    finished_at: datetime | None
    fit_seconds: float | None


@dataclass(frozen=True)
class AuditEntryInfo:
    """One audited change: ``actor`` did ``action`` (e.g. ``expert.set_state``) to a target."""

    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    details: dict[str, Any]


@dataclass(frozen=True)
class CompositionInfo:
    """A named, versioned few-shot composition: ``sum_j weights[j] * expert_ids[j]``'s LoRA.

    ``search`` records how the weights were found (config, example count, loss before/after,
    evaluations, seconds); ``examples`` is empty unless the user asked to keep them.
    """

    id: str
    name: str
    version: int
    expert_ids: tuple[str, ...]
    weights: tuple[float, ...]
    label_names: tuple[str, ...]
    search: Mapping[str, Any]
    examples: tuple[tuple[str, str], ...]
    created_by: str
    created_at: datetime
