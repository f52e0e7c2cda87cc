"""Housekeeping: unreferenced blobs and abandoned uploads are swept, nothing in use is touched."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import grpc
import pytest

from moerge.contributor_client.upload import describe_files, make_manifest, upload_expert
from moerge.coordinator.housekeeping import ACTOR, sweep
from moerge.storage.blobstore import BlobStore
from moerge.storage.blobstore_local import LocalBlobStore
from moerge.v1 import contributor_pb2, contributor_pb2_grpc
from tests.coordinator.conftest import coordinator_config
from tests.coordinator.harness import BackgroundCoordinator
from tests.coordinator.test_uploads import _cut_half_way, _target
from tests.experts import make_expert_dir

DAY = 24 * 3600.0


def _age(store: BlobStore, sha256: str, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(store.path(sha256), (old, old))


@pytest.fixture
def expert(tmp_path: Path, tiny_bert: Path) -> Path:
    return make_expert_dir(tiny_bert, tmp_path / "expert")


def _upload_status(coordinator: BackgroundCoordinator, token: str, upload_id: str):
    with grpc.insecure_channel(coordinator.address) as ch:
        return contributor_pb2_grpc.ContributorServiceStub(ch).GetUploadStatus(
            contributor_pb2.GetUploadStatusRequest(upload_id=upload_id),
            metadata=(("authorization", f"Bearer {token}"),),
        )


def test_sweep_removes_old_orphan_blobs_and_stale_uploads_and_keeps_everything_in_use(
    tmp_path: Path, tiny_bert: Path, db_url: str, expert: Path
) -> None:
    config = coordinator_config(tmp_path / "data", tiny_bert, db_url)
    with BackgroundCoordinator(config) as coordinator:
        state = coordinator.state
        target = _target(coordinator)
        committed = upload_expert(target, expert, "kept", "toy", progress=False)
        partial = tmp_path / "partial"
        shutil.copytree(expert, partial)
        held = _cut_half_way(coordinator, target, partial)  # an upload abandoned half way
        assert held > 0
        old_orphan = state.blobs.put_bytes(b"artifact of a fit killed after storing it").sha256
        young_orphan = state.blobs.put_bytes(b"linked by a commit in progress").sha256
        _age(state.blobs, old_orphan, 2 * 3600)
        for f in committed.expert.files:  # in use, however old
            _age(state.blobs, f.sha256, 30 * DAY)
        time.sleep(0.05)

        result = sweep(
            state.registry,
            state.blobs,
            state.uploads,
            blob_min_age_seconds=3600,
            stale_upload_seconds=0.01,
        )

        assert (result.blobs_removed, result.uploads_removed) == (1, 1)
        assert not state.blobs.path(old_orphan).exists()
        assert state.blobs.verify(young_orphan)
        for f in committed.expert.files:
            assert state.blobs.verify(f.sha256)
        abandoned = make_manifest(describe_files(partial), "restarted", "toy", "").upload_id
        with pytest.raises(grpc.RpcError) as err:
            _upload_status(coordinator, target.token, abandoned)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert not any(state.uploads.staging_dir.rglob("*.d"))  # staged bytes gone
        audit = state.registry.list_audit(page_size=50).items
        assert any(a.action == "upload.delete" and a.actor == ACTOR for a in audit)
        # the committed upload is not stale, whatever its age
        kept = make_manifest(describe_files(expert), "kept", "toy", "").upload_id
        assert _upload_status(coordinator, target.token, kept).state == "committed"


def test_sweep_keeps_an_unfinished_upload_that_is_still_being_written(
    tmp_path: Path, tiny_bert: Path, expert: Path
) -> None:
    config = coordinator_config(tmp_path / "data", tiny_bert)
    with BackgroundCoordinator(config) as coordinator:
        state = coordinator.state
        target = _target(coordinator)
        held = _cut_half_way(coordinator, target, expert)
        result = sweep(
            state.registry,
            state.blobs,
            state.uploads,
            blob_min_age_seconds=3600,
            stale_upload_seconds=3600,
        )
        assert result.uploads_removed == 0
        upload_id = make_manifest(describe_files(expert), "restarted", "toy", "").upload_id
        assert _upload_status(coordinator, target.token, upload_id).received_bytes == held


def test_coordinator_sweeps_orphan_blobs_at_start(tmp_path: Path, tiny_bert: Path) -> None:
    config = coordinator_config(tmp_path / "data", tiny_bert, housekeeping_interval_seconds=3600.0)
    store = LocalBlobStore(config.blob_dir)
    orphan = store.put_bytes(b"left by a crash").sha256
    _age(store, orphan, 2 * 3600)
    with BackgroundCoordinator(config):
        deadline = time.monotonic() + 20
        while store.path(orphan).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not store.path(orphan).exists()
