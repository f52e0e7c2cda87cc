"""Registering, versioning, listing, quarantining and deleting experts."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest

from moerge.refusals import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from moerge.storage.blobstore import BlobRef, BlobStore
from moerge.storage.records import StatisticsSummary, content_digest
from moerge.storage.registry import Registry
from tests.storage.helpers import ADMIN, new_expert


def test_register_expert_stores_its_files_and_statistics(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    spec = new_expert(blobs)
    expert, created = registry.register_expert(ADMIN, contributor_id, spec)
    assert created
    assert expert.contributor_id == contributor_id
    assert (expert.name, expert.version, expert.state) == ("sentiment", 1, "active")
    assert expert.task_description == "Movie review sentiment.\nBinary labels."
    assert expert.target_modules == ("query", "value")
    assert expert.label_names == ("negative", "positive")
    assert expert.files == dict(spec.files)
    assert expert.statistics == spec.statistics
    assert expert.statistics.dp == {"epsilon": 8.0, "delta": 1e-5, "clip_norm": 1.0}
    assert expert.content_sha256 == spec.content_sha256
    assert expert.created_at.tzinfo is not None
    assert registry.get_expert(expert.id) == expert


def test_content_digest_covers_sorted_name_and_digest_lines() -> None:
    files = {"b.json": BlobRef("b" * 64, 1), "a.bin": BlobRef("a" * 64, 2)}
    expected = hashlib.sha256(f"a.bin:{'a' * 64}\nb.json:{'b' * 64}".encode()).hexdigest()
    assert content_digest(files) == expected


def test_registering_the_same_content_again_returns_the_existing_expert(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    first, _ = registry.register_expert(ADMIN, contributor_id, new_expert(blobs))
    again, created = registry.register_expert(ADMIN, contributor_id, new_expert(blobs))
    assert not created
    assert again == first
    assert len(registry.list_experts().items) == 1


def test_new_content_under_the_same_name_becomes_the_next_version(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    v1, _ = registry.register_expert(ADMIN, contributor_id, new_expert(blobs, content=b"v1"))
    v2, created = registry.register_expert(ADMIN, contributor_id, new_expert(blobs, content=b"v2"))
    assert created
    assert (v1.version, v2.version) == (1, 2)
    assert v1.id != v2.id
    # Re-uploading the first content finds version 1 instead of creating version 3.
    again, created = registry.register_expert(
        ADMIN, contributor_id, new_expert(blobs, content=b"v1")
    )
    assert (again.id, created) == (v1.id, False)


def test_each_contributor_and_name_counts_its_own_versions(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    _, enrollment = registry.create_enrollment_token(ADMIN)
    other, _ = registry.join(enrollment, "bob")
    mine, _ = registry.register_expert(ADMIN, contributor_id, new_expert(blobs))
    theirs, created = registry.register_expert(ADMIN, other.id, new_expert(blobs))
    renamed, _ = registry.register_expert(ADMIN, contributor_id, new_expert(blobs, name="other"))
    assert created
    assert (mine.version, theirs.version, renamed.version) == (1, 1, 1)
    assert mine.id != theirs.id


def test_register_refuses_files_missing_from_the_blob_store(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    spec = new_expert(blobs)
    missing = dict(spec.files, extra=BlobRef("e" * 64, 3))
    with pytest.raises(FailedPrecondition, match="e" * 64):
        registry.register_expert(ADMIN, contributor_id, dataclasses.replace(spec, files=missing))
    wrong_size = dict(spec.files)
    sha, size = wrong_size["statistics.json"]
    wrong_size["statistics.json"] = BlobRef(sha, size + 1)
    with pytest.raises(FailedPrecondition, match="bytes"):
        registry.register_expert(ADMIN, contributor_id, dataclasses.replace(spec, files=wrong_size))
    assert registry.list_experts().items == ()


MALFORMED_EXPERTS: list[tuple[dict[str, Any], str]] = [
    ({"name": "../escape"}, "name"),
    ({"task_name": ""}, "task_name"),
    ({"task_description": "bell\x07"}, "task_description"),
    ({"lora_rank": 0}, "lora_rank"),
    ({"example_count": -1}, "example_count"),
    ({"label_names": ["ok", "new\nline"]}, "label_names[1]"),
    ({"target_modules": "query"}, "target_modules"),
    ({"files": {}}, "files"),
    ({"files": {"../x": BlobRef("a" * 64, 1)}}, "files"),
    ({"files": {"x": BlobRef("../" * 21 + "a", 1)}}, "files['x'].sha256"),
    ({"statistics": StatisticsSummary(0, 1, 1)}, "statistics.hidden_size"),
    (
        {"statistics": StatisticsSummary(1, 1, 1, summary={"x": float("nan")})},
        "statistics.summary",
    ),
]


def test_register_refuses_a_malformed_expert_naming_the_field(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    for change, field in MALFORMED_EXPERTS:
        with pytest.raises(InvalidArgument) as raised:
            registry.register_expert(ADMIN, contributor_id, new_expert(blobs, **change))
        assert raised.value.field == field, change
    assert registry.list_experts().items == ()


def test_register_refuses_unknown_and_revoked_contributors(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    with pytest.raises(NotFound):
        registry.register_expert(ADMIN, "0" * 32, new_expert(blobs))
    registry.revoke_contributor(ADMIN, contributor_id, "spam")
    with pytest.raises(PermissionDenied):
        registry.register_expert(ADMIN, contributor_id, new_expert(blobs))


def test_list_experts_pages_in_a_stable_order(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    created = [
        registry.register_expert(ADMIN, contributor_id, new_expert(blobs, name=f"e{i}"))[0]
        for i in range(5)
    ]
    first = registry.list_experts(page_size=2)
    assert [e.id for e in first.items] == [e.id for e in created[:2]]
    # An expert added between pages appears at the end, not in the middle.
    late, _ = registry.register_expert(ADMIN, contributor_id, new_expert(blobs, name="late"))
    seen = list(first.items)
    token = first.next_page_token
    while token is not None:
        page = registry.list_experts(page_size=2, page_token=token)
        seen.extend(page.items)
        token = page.next_page_token
    assert [e.id for e in seen] == [e.id for e in [*created, late]]


def test_list_experts_filters_by_state_contributor_and_task(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    _, enrollment = registry.create_enrollment_token(ADMIN)
    other, _ = registry.join(enrollment, "bob")
    a, _ = registry.register_expert(ADMIN, contributor_id, new_expert(blobs, name="a"))
    b, _ = registry.register_expert(
        ADMIN, contributor_id, new_expert(blobs, name="b", task_name="mnli")
    )
    c, _ = registry.register_expert(ADMIN, other.id, new_expert(blobs, name="c"))
    registry.set_expert_state(ADMIN, a.id, "quarantined", "odd statistics")

    def ids(**filters: Any) -> list[str]:
        return [e.id for e in registry.list_experts(**filters).items]

    assert ids(state="quarantined") == [a.id]
    assert ids(state="active") == [b.id, c.id]
    assert ids(contributor_id=other.id) == [c.id]
    assert ids(task_name="mnli") == [b.id]
    assert ids(task_name="sst2", state="active") == [c.id]


def test_bad_page_tokens_are_refused(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    for i in range(3):
        registry.register_expert(ADMIN, contributor_id, new_expert(blobs, name=f"e{i}"))
    _, enrollment = registry.create_enrollment_token(ADMIN, max_uses=3)
    for name in ("x", "y"):
        registry.join(enrollment, name)
    contributors_token = registry.list_contributors(page_size=1).next_page_token
    assert contributors_token is not None
    for bad in ["garbage", "", "eyJ4Ijox", "W10", contributors_token, "=" * 2000]:
        with pytest.raises(InvalidArgument) as raised:
            registry.list_experts(page_size=1, page_token=bad)
        assert raised.value.field == "page_token"
    for bad_size in (0, 1001):
        with pytest.raises(InvalidArgument, match="page_size"):
            registry.list_experts(page_size=bad_size)


def test_expert_states_drive_active_experts_and_the_fingerprint(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    empty = registry.expert_set_fingerprint()
    assert empty == hashlib.sha256(b"").hexdigest()
    a, _ = registry.register_expert(ADMIN, contributor_id, new_expert(blobs, name="a"))
    b, _ = registry.register_expert(ADMIN, contributor_id, new_expert(blobs, name="b"))
    both = registry.expert_set_fingerprint()
    assert both == hashlib.sha256("\n".join(sorted([a.id, b.id])).encode()).hexdigest()
    assert [e.id for e in registry.active_experts()] == [a.id, b.id]

    quarantined = registry.set_expert_state(ADMIN, a.id, "quarantined", "looks poisoned")
    assert (quarantined.state, quarantined.state_reason) == ("quarantined", "looks poisoned")
    assert quarantined.updated_at >= a.updated_at
    assert [e.id for e in registry.active_experts()] == [b.id]
    assert registry.expert_set_fingerprint() not in (empty, both)

    registry.set_expert_state(ADMIN, a.id, "active")
    assert registry.expert_set_fingerprint() == both


def test_set_expert_state_refuses_unknown_states_and_experts(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    expert, _ = registry.register_expert(ADMIN, contributor_id, new_expert(blobs))
    with pytest.raises(InvalidArgument) as raised:
        registry.set_expert_state(ADMIN, expert.id, "deleted")
    assert raised.value.field == "state"
    with pytest.raises(NotFound):
        registry.set_expert_state(ADMIN, "f" * 32, "retired")
    assert registry.get_expert(expert.id).state == "active"


def test_delete_expert_removes_only_blobs_nothing_else_uses(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    doomed, _ = registry.register_expert(ADMIN, contributor_id, new_expert(blobs, content=b"own"))
    kept, _ = registry.register_expert(
        ADMIN, contributor_id, new_expert(blobs, name="kept", content=b"kept")
    )
    # The router artifact happens to be identical to one of the doomed expert's files.
    own_weights = doomed.files["adapter_model.safetensors"]
    router = registry.create_router_version(ADMIN, "arrow", {}, [doomed.id, kept.id], "manual")
    registry.complete_router_version(router.version, own_weights, {}, 1.0)
    unique_weights = blobs.put_bytes(b"only in doomed")
    config = blobs.put_bytes(b"config only in doomed")
    doomed2, _ = registry.register_expert(
        ADMIN,
        contributor_id,
        new_expert(
            blobs,
            name="doomed2",
            files={"adapter_model.safetensors": unique_weights, "adapter_config.json": config},
        ),
    )

    result = registry.delete_expert(ADMIN, doomed2.id)
    assert sorted(result.digests) == sorted([unique_weights.sha256, config.sha256])
    assert result.removed == 2
    assert result.bytes_freed == unique_weights.size + config.size
    assert not blobs.exists(unique_weights.sha256)

    # Shared with "kept" (config, statistics) or the router (weights): nothing is removed.
    result = registry.delete_expert(ADMIN, doomed.id)
    assert (result.removed, result.bytes_freed, result.digests) == (0, 0, ())
    for ref in [*kept.files.values(), own_weights]:
        assert blobs.exists(ref.sha256)
    with pytest.raises(NotFound):
        registry.get_expert(doomed.id)
    with pytest.raises(NotFound):
        registry.delete_expert(ADMIN, doomed.id)
    assert registry.referenced_blobs() == {r.sha256 for r in kept.files.values()} | {
        own_weights.sha256
    }


def test_identical_content_under_a_new_name_is_the_expert_already_registered(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    first, _ = registry.register_expert(ADMIN, contributor_id, new_expert(blobs, content=b"w"))
    again, created = registry.register_expert(
        ADMIN, contributor_id, new_expert(blobs, name="renamed", content=b"w")
    )
    assert not created
    assert again.id == first.id
    assert [e.id for e in registry.active_experts()] == [first.id]


def test_a_quarantined_expert_uploaded_again_under_a_new_name_stays_quarantined(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    first, _ = registry.register_expert(ADMIN, contributor_id, new_expert(blobs, content=b"w"))
    registry.set_expert_state(ADMIN, first.id, "quarantined", "poisoned")
    again, created = registry.register_expert(
        ADMIN, contributor_id, new_expert(blobs, name="innocent", content=b"w")
    )
    assert (again.id, again.state, created) == (first.id, "quarantined", False)
    assert registry.active_experts() == []


def test_another_contributors_copy_of_a_quarantined_expert_starts_quarantined(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    first, _ = registry.register_expert(ADMIN, contributor_id, new_expert(blobs, content=b"w"))
    registry.set_expert_state(ADMIN, first.id, "quarantined", "poisoned")
    _, enrollment = registry.create_enrollment_token(ADMIN)
    other, _ = registry.join(enrollment, "mallory")
    copy, created = registry.register_expert(ADMIN, other.id, new_expert(blobs, content=b"w"))
    assert created
    assert copy.state == "quarantined"
    assert first.id in copy.state_reason
    assert registry.active_experts() == []
