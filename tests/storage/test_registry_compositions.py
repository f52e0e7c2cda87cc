"""Few-shot compositions in the registry: versions by name, pinning, examples kept on request."""

from __future__ import annotations

import pytest

from moerge.refusals import InvalidArgument, NotFound
from moerge.storage.blobstore import BlobStore
from moerge.storage.compositions import CompositionStore
from moerge.storage.registry import Registry
from tests.storage.helpers import ADMIN, new_expert


def two_experts(registry: Registry, blobs: BlobStore) -> list[str]:
    contributor, _ = registry.join(registry.create_enrollment_token(ADMIN)[1], "lab")
    return [
        registry.register_expert(ADMIN, contributor.id, new_expert(blobs, name))[0].id
        for name in ("films", "food")
    ]


def test_saving_a_name_again_adds_its_next_version_and_get_pins_either(
    registry: Registry, blobs: BlobStore
) -> None:
    experts = two_experts(registry, blobs)
    store = CompositionStore(registry)
    search = {"loss": 0.4, "evaluations": 40}
    first = store.create(ADMIN, "reviews", experts, [0.7, -0.2], ["negative", "positive"], search)
    second = store.create(ADMIN, "reviews", experts, [0.5, 0.5], ["negative", "positive"], search)
    assert (first.version, second.version) == (1, 2)
    assert first.weights == (0.7, -0.2) and first.expert_ids == tuple(experts)
    assert first.search == search and first.examples == ()
    assert store.get("reviews") == second
    assert store.get("reviews", 1) == first
    assert [c.version for c in store.list("reviews").items] == [2, 1]
    assert registry.list_audit().items[0].action == "composition.create"


def test_examples_are_stored_only_when_kept(registry: Registry, blobs: BlobStore) -> None:
    experts = two_experts(registry, blobs)
    store = CompositionStore(registry)
    kept = store.create(
        ADMIN, "kept", experts, [1.0, 0.0], ["a"], {}, examples=[("great soup", "positive")]
    )
    assert store.get("kept").examples == (("great soup", "positive"),) == kept.examples
    assert (
        store.get(store.create(ADMIN, "dropped", experts, [1.0, 0.0], ["a"], {}).name).examples
        == ()
    )


def test_unknown_names_versions_and_experts_are_refused(
    registry: Registry, blobs: BlobStore
) -> None:
    experts = two_experts(registry, blobs)
    store = CompositionStore(registry)
    with pytest.raises(NotFound):
        store.get("missing")
    store.create(ADMIN, "one", experts, [1.0, 1.0], [], {})
    with pytest.raises(NotFound):
        store.get("one", 2)
    with pytest.raises(NotFound):
        store.create(ADMIN, "bad", [experts[0], "f" * 32], [1.0, 1.0], [], {})
    with pytest.raises(InvalidArgument):
        store.create(ADMIN, "bad", experts, [1.0, float("nan")], [], {})
    with pytest.raises(InvalidArgument):
        store.create(ADMIN, "../x", experts, [1.0, 1.0], [], {})
