"""Resumable uploads and committing them as experts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, update

from moerge.refusals import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from moerge.storage.blobstore import BlobRef, BlobStore
from moerge.storage.models import Upload
from moerge.storage.registry import Registry, utcnow
from tests.storage.helpers import ADMIN, new_expert

MANIFEST = {"files": [{"name": "adapter_model.safetensors", "sha256": "a" * 64, "size": 7}]}


def test_begin_upload_then_resume_it_with_the_same_manifest(
    registry: Registry, contributor_id: str
) -> None:
    upload = registry.begin_upload(contributor_id, "up-1", MANIFEST, total_bytes=100)
    assert (upload.state, upload.received_bytes, upload.total_bytes) == ("receiving", 0, 100)
    assert upload.manifest == MANIFEST
    registry.set_upload_progress(contributor_id, "up-1", 40)
    resumed = registry.begin_upload(contributor_id, "up-1", MANIFEST, total_bytes=100)
    assert resumed.received_bytes == 40
    assert resumed.created_at == upload.created_at
    assert registry.get_upload(contributor_id, "up-1") == resumed


def test_begin_upload_refuses_the_same_id_with_another_manifest(
    registry: Registry, contributor_id: str
) -> None:
    registry.begin_upload(contributor_id, "up-1", MANIFEST, total_bytes=100)
    with pytest.raises(FailedPrecondition, match="different manifest"):
        registry.begin_upload(contributor_id, "up-1", {"files": []}, total_bytes=100)
    with pytest.raises(FailedPrecondition, match="different manifest"):
        registry.begin_upload(contributor_id, "up-1", MANIFEST, total_bytes=101)


def test_begin_upload_refuses_bad_arguments_and_revoked_contributors(
    registry: Registry, contributor_id: str
) -> None:
    with pytest.raises(InvalidArgument, match="upload_id"):
        registry.begin_upload(contributor_id, "../up", MANIFEST, total_bytes=1)
    with pytest.raises(InvalidArgument, match="manifest"):
        not_a_dict: Any = ["not", "a", "dict"]
        registry.begin_upload(contributor_id, "up", not_a_dict, total_bytes=1)
    with pytest.raises(InvalidArgument, match="total_bytes"):
        registry.begin_upload(contributor_id, "up", MANIFEST, total_bytes=-1)
    with pytest.raises(NotFound):
        registry.begin_upload("0" * 32, "up", MANIFEST, total_bytes=1)
    registry.revoke_contributor(ADMIN, contributor_id, "gone")
    with pytest.raises(PermissionDenied):
        registry.begin_upload(contributor_id, "up", MANIFEST, total_bytes=1)


def test_upload_progress_stays_within_the_announced_size(
    registry: Registry, contributor_id: str
) -> None:
    registry.begin_upload(contributor_id, "up-1", MANIFEST, total_bytes=100)
    assert registry.set_upload_progress(contributor_id, "up-1", 100).received_bytes == 100
    with pytest.raises(InvalidArgument, match="received_bytes"):
        registry.set_upload_progress(contributor_id, "up-1", 101)
    with pytest.raises(NotFound):
        registry.set_upload_progress(contributor_id, "missing", 1)


def test_a_failed_upload_keeps_its_error_when_begun_again(
    registry: Registry, contributor_id: str
) -> None:
    registry.begin_upload(contributor_id, "up-1", MANIFEST, total_bytes=100)
    failed = registry.fail_upload(contributor_id, "up-1", "digest mismatch in adapter\x00")
    assert failed.state == "failed"
    assert failed.error == "digest mismatch in adapter?"
    with pytest.raises(FailedPrecondition, match="failed"):
        registry.set_upload_progress(contributor_id, "up-1", 10)
    again = registry.begin_upload(contributor_id, "up-1", MANIFEST, total_bytes=100)
    assert again == failed


def test_commit_upload_registers_the_expert_and_commits_the_upload_together(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    registry.begin_upload(contributor_id, "up-1", MANIFEST, total_bytes=100)
    expert, created = registry.commit_upload(
        f"contributor:{contributor_id}", contributor_id, "up-1", new_expert(blobs)
    )
    assert created
    upload = registry.get_upload(contributor_id, "up-1")
    assert (upload.state, upload.expert_id, upload.received_bytes) == ("committed", expert.id, 100)
    assert registry.get_expert(expert.id) == expert

    # Retrying the commit, or beginning the upload again, points at the same expert.
    again, created = registry.commit_upload(
        f"contributor:{contributor_id}", contributor_id, "up-1", new_expert(blobs)
    )
    assert (again, created) == (expert, False)
    assert registry.begin_upload(contributor_id, "up-1", MANIFEST, 100).expert_id == expert.id
    with pytest.raises(FailedPrecondition, match="committed"):
        registry.fail_upload(contributor_id, "up-1", "too late")


def test_a_refused_commit_leaves_the_upload_receiving_and_no_expert(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    registry.begin_upload(contributor_id, "up-1", MANIFEST, total_bytes=100)
    spec = new_expert(blobs, files={"adapter_model.safetensors": BlobRef("c" * 64, 5)})
    with pytest.raises(FailedPrecondition, match="c" * 64):
        registry.commit_upload(ADMIN, contributor_id, "up-1", spec)
    assert registry.get_upload(contributor_id, "up-1").state == "receiving"
    assert registry.list_experts().items == ()
    registry.fail_upload(contributor_id, "up-1", "validation failed")
    with pytest.raises(FailedPrecondition, match="failed"):
        registry.commit_upload(ADMIN, contributor_id, "up-1", new_expert(blobs))


def test_a_committed_upload_survives_the_deletion_of_its_expert(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    registry.begin_upload(contributor_id, "up-1", MANIFEST, total_bytes=100)
    expert, _ = registry.commit_upload(ADMIN, contributor_id, "up-1", new_expert(blobs))
    registry.delete_expert(ADMIN, expert.id)
    upload = registry.get_upload(contributor_id, "up-1")
    assert (upload.state, upload.expert_id) == ("committed", None)
    with pytest.raises(FailedPrecondition, match="deleted"):
        registry.commit_upload(ADMIN, contributor_id, "up-1", new_expert(blobs))


def test_stale_uploads_are_the_unfinished_ones_untouched_for_long(
    registry: Registry, blobs: BlobStore, engine: Engine, contributor_id: str
) -> None:
    for upload_id in ("old-receiving", "old-failed", "old-committed", "fresh"):
        registry.begin_upload(contributor_id, upload_id, MANIFEST, total_bytes=100)
    registry.fail_upload(contributor_id, "old-failed", "broken pipe")
    registry.commit_upload(ADMIN, contributor_id, "old-committed", new_expert(blobs))
    two_hours_ago = utcnow() - timedelta(hours=2)
    with engine.begin() as connection:
        connection.execute(
            update(Upload)
            .where(Upload.upload_id.in_(["old-receiving", "old-failed", "old-committed"]))
            .values(updated_at=two_hours_ago)
        )
    stale = registry.stale_uploads(older_than_seconds=3600)
    assert sorted(u.upload_id for u in stale) == ["old-failed", "old-receiving"]
    assert len(registry.stale_uploads(older_than_seconds=0)) == 3


def test_delete_upload_forgets_it(registry: Registry, contributor_id: str) -> None:
    registry.begin_upload(contributor_id, "up-1", MANIFEST, total_bytes=100)
    registry.delete_upload("system", contributor_id, "up-1")
    with pytest.raises(NotFound):
        registry.get_upload(contributor_id, "up-1")
    with pytest.raises(NotFound):
        registry.delete_upload("system", contributor_id, "up-1")
