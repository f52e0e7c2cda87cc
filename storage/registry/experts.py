"""Experts: registering them (idempotent per contributor and content), their states, deletion.

An expert's files are blobs already in the blob store; its row names them, with the statistics
routers train on. Registration is also reached through ``commit_upload``
(:mod:`moerge.storage.registry.uploads`), and deleting an expert collects the blobs that nothing
references any more, router artifacts included.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import cast
from uuid import uuid4

from sqlalchemy import ColumnElement, func, select, text
from sqlalchemy.orm import Session

from moerge.refusals import InvalidArgument, NotFound, PermissionDenied
from moerge.storage.blobstore import BlobRef, GcResult
from moerge.storage.models import Contributor, Expert, ExpertFile, ExpertStatistics, RouterVersion
from moerge.storage.records import (
    EXPERT_STATES,
    ExpertInfo,
    ExpertState,
    NewExpert,
    Page,
    StatisticsSummary,
    content_digest,
)
from moerge.storage.registry.base import MAX_REASON, MAX_TEXT, RegistryBase, utcnow
from moerge.storage.registry.helpers import check_actor, check_blob_ref, page_oldest_first, truncate
from moerge.storage.validation import (
    check_id,
    check_int,
    check_json_object,
    check_name,
    check_string_list,
    check_text,
)

#: The audit log's actor for experts quarantined by the admission hook (consistency checks).
ADMISSION_ACTOR = "system:consistency"
#: At most this many target modules, and as many label names, per expert.
MAX_LIST_ITEMS = 4096
#: At most this many files per expert.
MAX_FILES = 64


class ExpertsMixin(RegistryBase):
    """Register, read, list, change the state of and delete experts."""

    def register_expert(
        self, actor: str, contributor_id: str, spec: NewExpert
    ) -> tuple[ExpertInfo, bool]:
        """Record an expert whose files are already in the blob store.

        Idempotent: if this contributor has an expert with the same content (under any name),
        that expert is returned with ``created=False``; otherwise the next version of the name
        is created (quarantined if another contributor's identical expert is not active).
        """
        actor = check_actor(actor)
        contributor_id = check_id("contributor_id", contributor_id)
        check_new_expert(spec)
        quarantine = self._admission_reason(contributor_id, spec)
        with self._write() as session:
            return self._register(session, actor, contributor_id, spec, quarantine)

    def _admission_reason(self, contributor_id: str, spec: NewExpert) -> str:
        """Why the coordinator's admission hook quarantines ``spec`` ("" = admit it)."""
        if self.admission is None:
            return ""
        return truncate(self.admission(contributor_id, spec))[:MAX_REASON]

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
            return expert_info(same), False
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
        return expert_info(expert), True

    def get_expert(self, expert_id: str) -> ExpertInfo:
        """One expert's record in any state; ``NotFound`` for an unknown id."""
        expert_id = check_id("expert_id", expert_id)
        with self._read() as session:
            return expert_info(_get_expert(session, expert_id))

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
            rows, next_token = page_oldest_first(
                session, Expert, "experts", conditions, page_size, page_token
            )
            return Page(tuple(expert_info(row) for row in rows), next_token)

    def active_experts(self) -> list[ExpertInfo]:
        """All active experts, oldest first: what routers are trained on."""
        with self._read() as session:
            rows = session.scalars(
                select(Expert)
                .where(Expert.state == "active")
                .order_by(Expert.created_at, Expert.id)
            )
            return [expert_info(row) for row in rows]

    def expert_set_fingerprint(self) -> str:
        """SHA-256 over the sorted ids of active experts; changes when a router is outdated."""
        with self._read() as session:
            ids = sorted(session.scalars(select(Expert.id).where(Expert.state == "active")))
        return hashlib.sha256("\n".join(ids).encode("ascii")).hexdigest()

    def set_expert_state(
        self, actor: str, expert_id: str, state: str, reason: str = ""
    ) -> ExpertInfo:
        """Quarantine, retire or re-activate an expert."""
        actor = check_actor(actor)
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
            return expert_info(expert)

    def delete_expert(self, actor: str, expert_id: str) -> GcResult:
        """Delete an expert, then its blobs unless another expert or a router still uses them."""
        actor = check_actor(actor)
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


def _check_state(state: object) -> str:
    if state not in EXPERT_STATES:
        raise InvalidArgument("state", f"must be one of {', '.join(EXPERT_STATES)}")
    return str(state)


def check_new_expert(spec: object) -> None:
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
        check_blob_ref(f"files[{name!r}]", ref)
    stats = spec.statistics
    if not isinstance(stats, StatisticsSummary):
        raise InvalidArgument("statistics", "must be a StatisticsSummary")
    check_int("statistics.hidden_size", stats.hidden_size, minimum=1)
    check_int("statistics.covariance_rank", stats.covariance_rank, minimum=0)
    check_int("statistics.gate_modules", stats.gate_modules, minimum=0)
    if stats.dp is not None:
        check_json_object("statistics.dp", stats.dp)
    check_json_object("statistics.summary", stats.summary)


def _get_expert(session: Session, expert_id: str) -> Expert:
    expert = session.get(Expert, expert_id)
    if expert is None:
        raise NotFound(f"expert {expert_id} not found")
    return expert


def expert_info(row: Expert) -> ExpertInfo:
    """The record callers see for an expert's row (files and statistics loaded with it)."""
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
