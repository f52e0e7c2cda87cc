"""Upload rows: the resumable state of a contributor's upload, from begin to commit.

The bytes travel elsewhere (:mod:`moerge.coordinator.uploads.receiver` stages them); the row records
the manifest, how much has arrived and how the upload ended. Committing registers the expert and
marks the upload committed in one transaction, so it builds on
:class:`~moerge.storage.registry.experts.ExpertsMixin`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.orm import Session

from moerge.refusals import FailedPrecondition, NotFound, PermissionDenied
from moerge.storage.models import Expert, Upload
from moerge.storage.records import ExpertInfo, NewExpert, UploadInfo, UploadState
from moerge.storage.registry.base import CONTRIBUTOR, SYSTEM_ACTOR, utcnow
from moerge.storage.registry.contributors import get_contributor_row
from moerge.storage.registry.experts import ExpertsMixin, check_new_expert, expert_info
from moerge.storage.registry.helpers import check_actor, truncate
from moerge.storage.validation import (
    check_id,
    check_int,
    check_json_object,
    check_name,
    check_seconds,
)


class UploadsMixin(ExpertsMixin):
    """Begin, resume, fail, commit, sweep and delete uploads."""

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
            contributor = get_contributor_row(session, contributor_id)
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
        """A contributor's upload by its id (upload ids are per contributor); ``NotFound`` when that
        contributor has none by this id."""
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
            upload.error = truncate(error)
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
        actor = check_actor(actor)
        check_new_expert(spec)
        quarantine = self._admission_reason(contributor_id, spec)
        with self._write() as session:
            upload = _get_upload(session, contributor_id, upload_id)
            if upload.state == "committed":
                expert = session.get(Expert, upload.expert_id) if upload.expert_id else None
                if expert is None:
                    raise FailedPrecondition(
                        f"upload {upload_id!r} was committed but its expert has been deleted"
                    )
                return expert_info(expert), False
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
        actor = check_actor(actor)
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


def _upload_target(contributor_id: str, upload_id: str) -> str:
    """Upload ids are chosen by contributors, so the audit target includes the contributor."""
    return f"{contributor_id}:{upload_id}"


def _get_upload(session: Session, contributor_id: str, upload_id: str) -> Upload:
    """The upload's row in ``session`` (ids checked first), or NotFound."""
    contributor_id = check_id("contributor_id", contributor_id)
    upload_id = check_name("upload_id", upload_id)
    upload = session.get(Upload, (contributor_id, upload_id))
    if upload is None:
        raise NotFound(f"upload {upload_id!r} of contributor {contributor_id} not found")
    return upload


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
