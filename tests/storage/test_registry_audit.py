"""Cross-cutting promises: every change is audited, refused calls change nothing, and
concurrent callers cannot break the registry's invariants."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine

from moerge.refusals import Refused, Unauthenticated
from moerge.storage.blobstore import BlobRef, BlobStore
from moerge.storage.registry import Registry
from moerge.storage.tokens import new_token
from tests.storage.helpers import ADMIN, dump, new_expert

MANIFEST = {"files": ["adapter_model.safetensors"]}


def test_every_state_change_writes_an_audit_entry(registry: Registry, blobs: BlobStore) -> None:
    seen = 0

    def expect(*actions: str) -> list[Any]:
        """The audit entries written since the last call, oldest first."""
        nonlocal seen
        entries = registry.list_audit(page_size=1000).items
        new = list(reversed(entries[: len(entries) - seen]))
        seen = len(entries)
        assert [entry.action for entry in new] == list(actions)
        return new

    admin_token = registry.create_admin_credential("system")
    expect("credential.create")
    _, imported = new_token("mga")
    imported_id = registry.import_admin_token(imported, "system")
    expect("credential.import")
    registry.revoke_credential(ADMIN, imported_id)
    (entry,) = expect("credential.revoke")
    assert (entry.actor, entry.target_type, entry.target_id) == (ADMIN, "credential", imported_id)

    token_info, enrollment = registry.create_enrollment_token(ADMIN, max_uses=2)
    expect("enrollment_token.create")
    contributor, _ = registry.join(enrollment, "alice")
    (entry,) = expect("contributor.join")
    assert entry.actor == f"enrollment:{token_info.id}"
    assert entry.target_id == contributor.id
    registry.revoke_enrollment_token(ADMIN, token_info.id)
    expect("enrollment_token.revoke")

    expert, _ = registry.register_expert(ADMIN, contributor.id, new_expert(blobs))
    (entry,) = expect("expert.register")
    assert entry.details["version"] == 1
    registry.set_expert_state(ADMIN, expert.id, "retired", "superseded")
    (entry,) = expect("expert.set_state")
    assert entry.details == {"from": "active", "to": "retired", "reason": "superseded"}

    actor = f"contributor:{contributor.id}"
    registry.begin_upload(contributor.id, "up-1", MANIFEST, 10)
    (entry,) = expect("upload.begin")
    assert entry.actor == actor
    registry.set_upload_progress(contributor.id, "up-1", 5)
    expect()  # progress is bookkeeping, not a change worth auditing
    committed, _ = registry.commit_upload(
        actor, contributor.id, "up-1", new_expert(blobs, content=b"v2")
    )
    expect("expert.register", "upload.commit")
    registry.begin_upload(contributor.id, "up-2", MANIFEST, 10)
    registry.fail_upload(contributor.id, "up-2", "broken pipe")
    expect("upload.begin", "upload.fail")
    registry.delete_upload(ADMIN, contributor.id, "up-2")
    (entry,) = expect("upload.delete")
    assert entry.target_id == f"{contributor.id}:up-2"

    version = registry.create_router_version(ADMIN, "arrow", {}, [committed.id], "manual").version
    expect("router.create")
    registry.complete_router_version(version, blobs.put_bytes(b"router"), {}, 1.0)
    expect("router.complete", "router.activate")
    second = registry.create_router_version(ADMIN, "arrow", {}, [committed.id], "manual").version
    registry.complete_router_version(second, blobs.put_bytes(b"router 2"), {}, 1.0, activate=False)
    expect("router.create", "router.complete")
    registry.activate_router_version(ADMIN, second)
    (entry,) = expect("router.activate")
    assert entry.details == {"previous": version}
    failed = registry.create_router_version(ADMIN, "arrow", {}, [], "periodic").version
    registry.fail_router_version(failed, "no experts")
    expect("router.create", "router.fail")
    registry.create_router_version(ADMIN, "arrow", {}, [], "periodic")
    registry.fail_interrupted_router_versions()
    expect("router.create", "router.fail")

    registry.delete_expert(ADMIN, expert.id)
    expect("expert.delete")
    registry.revoke_contributor(ADMIN, contributor.id, "left the project")
    expect("contributor.revoke")
    assert registry.authenticate(admin_token) is not None
    expect()  # authentication is not a change either


def test_list_audit_is_newest_first_with_filters_and_pages(
    registry: Registry, blobs: BlobStore
) -> None:
    _, enrollment = registry.create_enrollment_token(ADMIN, max_uses=3)
    ids = [registry.join(enrollment, f"member-{i}")[0].id for i in range(3)]
    joins = registry.list_audit(action="contributor.join").items
    assert [entry.target_id for entry in joins] == ids[::-1]
    assert all(entry.at.tzinfo is not None for entry in joins)
    assert [e.action for e in registry.list_audit(target_id=ids[1]).items] == ["contributor.join"]

    seen = []
    page = registry.list_audit(page_size=2)
    while True:
        seen.extend(page.items)
        if page.next_page_token is None:
            break
        page = registry.list_audit(page_size=2, page_token=page.next_page_token)
    assert [entry.id for entry in seen] == sorted((entry.id for entry in seen), reverse=True)
    assert len(seen) == 4


def test_refused_calls_leave_the_database_unchanged(
    registry: Registry, blobs: BlobStore, engine: Engine
) -> None:
    _, enrollment = registry.create_enrollment_token(ADMIN, max_uses=5)
    alice, _ = registry.join(enrollment, "alice")
    bob, _ = registry.join(enrollment, "bob")
    registry.revoke_contributor(ADMIN, bob.id, "spam")
    expert, _ = registry.register_expert(ADMIN, alice.id, new_expert(blobs))
    registry.begin_upload(alice.id, "up-1", MANIFEST, 10)
    registry.begin_upload(alice.id, "committed", MANIFEST, 10)
    registry.commit_upload(ADMIN, alice.id, "committed", new_expert(blobs))
    training = registry.create_router_version(ADMIN, "arrow", {}, [expert.id], "manual").version
    _, admin_token = new_token("mga")
    registry.import_admin_token(admin_token, "system")
    missing_blob = {"adapter_model.safetensors": BlobRef("0" * 64, 1)}
    missing_artifact = BlobRef("1" * 64, 1)
    _, expired_or_unknown = new_token("mge")

    refusals: list[Callable[[], object]] = [
        # Refused after rows were already written in the transaction: rolled back.
        lambda: registry.register_expert(ADMIN, alice.id, new_expert(blobs, files=missing_blob)),
        lambda: registry.commit_upload(
            ADMIN, alice.id, "up-1", new_expert(blobs, name="new", files=missing_blob)
        ),
        lambda: registry.complete_router_version(training, missing_artifact, {}, 1.0),
        # Refused before writing anything.
        lambda: registry.join(enrollment, "alice"),
        lambda: registry.join(enrollment, "../x"),
        lambda: registry.join(expired_or_unknown, "carol"),
        lambda: registry.revoke_contributor(ADMIN, bob.id, "again"),
        lambda: registry.register_expert(ADMIN, bob.id, new_expert(blobs, content=b"x")),
        lambda: registry.register_expert(ADMIN, alice.id, new_expert(blobs, lora_rank=-1)),
        lambda: registry.set_expert_state(ADMIN, expert.id, "deleted"),
        lambda: registry.delete_expert(ADMIN, "f" * 32),
        lambda: registry.begin_upload(alice.id, "up-1", {"other": True}, 10),
        lambda: registry.begin_upload(bob.id, "up-2", MANIFEST, 10),
        lambda: registry.set_upload_progress(alice.id, "up-1", 11),
        lambda: registry.fail_upload(alice.id, "committed", "late"),
        lambda: registry.activate_router_version(ADMIN, training),
        lambda: registry.fail_router_version(training + 1, "missing"),
        lambda: registry.import_admin_token(admin_token[:-4] + "zzzz", "system"),
        lambda: registry.create_enrollment_token(ADMIN, max_uses=0),
        lambda: registry.create_admin_credential("bad\nactor"),
    ]
    for refuse in refusals:
        before = dump(engine)
        with pytest.raises(Refused):
            refuse()
        assert dump(engine) == before


def run_concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls on as many threads; returns each result or the exception it raised."""

    def outcome(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:  # collected and asserted on by the caller
            return exc

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(outcome, calls))


def test_concurrent_joins_cannot_overuse_an_enrollment_token(registry: Registry) -> None:
    info, enrollment = registry.create_enrollment_token(ADMIN, max_uses=3)
    outcomes = run_concurrently(
        [lambda i=i: registry.join(enrollment, f"racer-{i}") for i in range(6)]
    )
    joined = [o for o in outcomes if not isinstance(o, Exception)]
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert len(joined) == 3
    assert all(isinstance(o, Unauthenticated) for o in refused)
    assert registry.get_enrollment_token(info.id).uses == 3


def test_concurrent_registrations_get_distinct_versions(
    registry: Registry, blobs: BlobStore, contributor_id: str
) -> None:
    specs = [new_expert(blobs, content=f"weights {i}".encode()) for i in range(4)]
    outcomes = run_concurrently(
        [lambda s=s: registry.register_expert(ADMIN, contributor_id, s) for s in specs]
    )
    assert all(isinstance(o, tuple) and o[1] for o in outcomes), outcomes
    assert sorted(o[0].version for o in outcomes) == [1, 2, 3, 4]


def test_concurrent_activations_leave_exactly_one_active_version(
    registry: Registry, blobs: BlobStore
) -> None:
    versions = []
    for i in range(4):
        version = registry.create_router_version(ADMIN, "arrow", {}, [], "manual").version
        registry.complete_router_version(
            version, blobs.put_bytes(f"router {i}".encode()), {}, 1.0, activate=False
        )
        versions.append(version)
    outcomes = run_concurrently(
        [lambda v=v: registry.activate_router_version(ADMIN, v) for v in versions]
    )
    assert not [o for o in outcomes if isinstance(o, Exception)], outcomes
    active = [v for v in registry.list_router_versions().items if v.active]
    assert len(active) == 1
    assert registry.active_router_version() == active[0]
