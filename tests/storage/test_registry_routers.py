"""Router versions: training, completion, activation, roll-back and crash recovery."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.exc import IntegrityError

from moerge.refusals import FailedPrecondition, InvalidArgument, NotFound
from moerge.storage.blobstore import BlobRef, BlobStore
from moerge.storage.models import RouterVersion
from moerge.storage.registry import Registry
from tests.storage.helpers import ADMIN

EXPERTS = ["a" * 32, "b" * 32]


def active_version(registry: Registry) -> int | None:
    active = registry.active_router_version()
    return None if active is None else active.version


def train(registry: Registry, blobs: BlobStore, method: str = "arrow", **kwargs: bool) -> int:
    """Create and complete a router version; returns its number."""
    version = registry.create_router_version(ADMIN, method, {"k": 2}, EXPERTS, "manual").version
    artifact = blobs.put_bytes(f"router {version}".encode())
    registry.complete_router_version(version, artifact, {"accuracy": 0.9}, 1.5, **kwargs)
    return version


def test_a_router_version_goes_from_training_to_ready_and_active(
    registry: Registry, blobs: BlobStore
) -> None:
    assert registry.active_router_version() is None
    created = registry.create_router_version(ADMIN, "phatgoose", {"top_k": 2}, EXPERTS, "manual")
    assert (created.status, created.active, created.created_by) == ("training", False, ADMIN)
    assert created.expert_ids == tuple(EXPERTS)
    assert created.params == {"top_k": 2}
    artifact = blobs.put_bytes(b"router weights")
    done = registry.complete_router_version(created.version, artifact, {"accuracy": 0.93}, 12.5)
    assert (done.status, done.active) == ("ready", True)
    assert (done.artifact_sha256, done.artifact_size) == artifact
    assert done.metrics == {"accuracy": 0.93}
    assert done.fit_seconds == 12.5
    assert done.finished_at is not None
    assert registry.active_router_version() == done
    assert registry.get_router_version(created.version) == done


def test_completing_a_new_version_leaves_it_the_only_active_one(
    registry: Registry, blobs: BlobStore
) -> None:
    first = train(registry, blobs)
    second = train(registry, blobs)
    assert active_version(registry) == second
    assert not registry.get_router_version(first).active
    kept = train(registry, blobs, activate=False)
    assert active_version(registry) == second
    assert registry.get_router_version(kept).status == "ready"


def test_activate_rolls_back_to_an_older_ready_version(
    registry: Registry, blobs: BlobStore
) -> None:
    first = train(registry, blobs)
    train(registry, blobs)
    rolled_back = registry.activate_router_version(ADMIN, first)
    assert rolled_back.active
    assert registry.active_router_version() == rolled_back
    assert [v.version for v in registry.list_router_versions().items if v.active] == [first]
    assert registry.activate_router_version(ADMIN, first) == rolled_back


def test_activate_refuses_versions_that_are_not_ready(registry: Registry, blobs: BlobStore) -> None:
    training = registry.create_router_version(ADMIN, "arrow", {}, EXPERTS, "periodic").version
    failed = registry.create_router_version(ADMIN, "arrow", {}, EXPERTS, "periodic").version
    registry.fail_router_version(failed, "out of memory")
    for version in (training, failed):
        with pytest.raises(FailedPrecondition, match=f"router version {version}"):
            registry.activate_router_version(ADMIN, version)
    with pytest.raises(NotFound):
        registry.activate_router_version(ADMIN, 999)
    assert registry.active_router_version() is None


def test_a_finished_version_cannot_be_completed_or_failed_again(
    registry: Registry, blobs: BlobStore
) -> None:
    version = train(registry, blobs)
    artifact = blobs.put_bytes(b"other")
    with pytest.raises(FailedPrecondition, match="ready"):
        registry.complete_router_version(version, artifact, {}, 1.0)
    with pytest.raises(FailedPrecondition, match="ready"):
        registry.fail_router_version(version, "late failure")


def test_fail_router_version_records_the_error(registry: Registry) -> None:
    version = registry.create_router_version(ADMIN, "arrow", {}, EXPERTS, "expert_change").version
    failed = registry.fail_router_version(version, "NaN loss")
    assert (failed.status, failed.error, failed.active) == ("failed", "NaN loss", False)
    assert failed.finished_at is not None


def test_complete_refuses_an_artifact_missing_from_the_blob_store(registry: Registry) -> None:
    version = registry.create_router_version(ADMIN, "arrow", {}, EXPERTS, "manual").version
    with pytest.raises(FailedPrecondition, match="d" * 64):
        registry.complete_router_version(version, BlobRef("d" * 64, 10), {}, 1.0)
    assert registry.get_router_version(version).status == "training"
    with pytest.raises(InvalidArgument, match="artifact"):
        registry.complete_router_version(version, ("../x", 10), {}, 1.0)


def test_create_router_version_refuses_bad_arguments(registry: Registry) -> None:
    with pytest.raises(InvalidArgument, match="method"):
        registry.create_router_version(ADMIN, "", {}, EXPERTS, "manual")
    with pytest.raises(InvalidArgument, match=r"expert_ids\[0\]"):
        registry.create_router_version(ADMIN, "arrow", {}, ["../"], "manual")
    with pytest.raises(InvalidArgument, match="params"):
        registry.create_router_version(ADMIN, "arrow", {"x": {1, 2}}, EXPERTS, "manual")
    assert registry.list_router_versions().items == ()


def test_interrupted_training_is_marked_failed_at_start(
    registry: Registry, blobs: BlobStore
) -> None:
    ready = train(registry, blobs)
    stuck = [
        registry.create_router_version(ADMIN, "arrow", {}, EXPERTS, "periodic").version
        for _ in range(2)
    ]
    assert registry.fail_interrupted_router_versions() == stuck
    for version in stuck:
        info = registry.get_router_version(version)
        assert info.status == "failed"
        assert "interrupted" in info.error
    assert registry.get_router_version(ready).status == "ready"
    assert registry.fail_interrupted_router_versions() == []


def test_list_router_versions_newest_first_by_pages_and_method(
    registry: Registry, blobs: BlobStore
) -> None:
    versions = [train(registry, blobs, method="arrow" if i % 2 else "centroid") for i in range(5)]
    seen: list[int] = []
    page = registry.list_router_versions(page_size=2)
    while True:
        seen.extend(v.version for v in page.items)
        if page.next_page_token is None:
            break
        page = registry.list_router_versions(page_size=2, page_token=page.next_page_token)
    assert seen == versions[::-1]
    arrow = registry.list_router_versions(method="arrow").items
    assert [v.version for v in arrow] == [versions[3], versions[1]]
    with pytest.raises(InvalidArgument, match="page_token"):
        registry.list_router_versions(page_token="bm9wZQ")


def test_the_database_itself_refuses_a_second_active_version(
    registry: Registry, blobs: BlobStore, engine: Engine
) -> None:
    first = train(registry, blobs)
    second = train(registry, blobs, activate=False)
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(
            update(RouterVersion).where(RouterVersion.version == second).values(active=True)
        )
    assert active_version(registry) == first
