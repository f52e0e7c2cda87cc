"""Router versions: one row per router trained, its artifact blob and which one is served.

A version is created 'training', then completed 'ready' (its artifact in the blob store) or
failed. At most one version is active; activating one deactivates the others in the same
transaction, serialised so that concurrent activations wait their turn.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from moerge.refusals import FailedPrecondition, InvalidArgument, NotFound
from moerge.storage.blobstore import BlobRef
from moerge.storage.models import RouterVersion
from moerge.storage.pagination import decode_page_token, encode_page_token
from moerge.storage.records import Page, RouterStatus, RouterVersionInfo
from moerge.storage.registry.base import SYSTEM_ACTOR, RegistryBase, utcnow
from moerge.storage.registry.helpers import check_actor, check_blob_ref, truncate
from moerge.storage.validation import (
    check_id,
    check_int,
    check_json_object,
    check_name,
    check_page_size,
    check_seconds,
)


class RoutersMixin(RegistryBase):
    """Record, complete, fail, activate and list router versions."""

    def create_router_version(
        self,
        actor: str,
        method: str,
        params: dict[str, Any],
        expert_ids: list[str],
        trigger: str,
    ) -> RouterVersionInfo:
        """Record that a router is being trained (status 'training')."""
        actor = check_actor(actor)
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
        ref = check_blob_ref("artifact", artifact)
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
        """Mark a router version still training as failed, with its (truncated) error; the active
        version stays as it is."""
        version = check_int("version", version, minimum=1)
        with self._write() as session:
            row = _get_router_version(session, version)
            if row.status != "training":
                raise FailedPrecondition(f"router version {version} is {row.status}, not training")
            row.status = "failed"
            row.error = truncate(error)
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
        actor = check_actor(actor)
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
        """Make ``row`` the only active version, auditing which one it replaced."""
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
        """The router version that serves requests, or None before the first fit."""
        with self._read() as session:
            row = session.scalar(select(RouterVersion).where(RouterVersion.active.is_(True)))
            return None if row is None else _router_info(row)

    def get_router_version(self, version: int) -> RouterVersionInfo:
        """One router version, whatever its status; ``NotFound`` for an unknown number."""
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


def _get_router_version(session: Session, version: int) -> RouterVersion:
    row = session.get(RouterVersion, version)
    if row is None:
        raise NotFound(f"router version {version} not found")
    return row


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
