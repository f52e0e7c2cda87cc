"""``Client.models`` (gRPC ListModels) for every inference credential, and unique id prefixes
taken by every ``Client``/``AsyncClient`` method that takes an id, as git takes commit ids."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import moerge
from tests.client.test_cli import served  # noqa: F401 (a fixture: experts t0 and t1)
from tests.coordinator.harness import BackgroundCoordinator

REVIEWS = [("the film was great", "pos"), ("a dull plot", "neg"), ("a delight", "pos")]


@pytest.fixture
def admin(running: BackgroundCoordinator) -> moerge.Client:
    with moerge.Client(running.address, token=running.admin_token()) as client:
        yield client


def test_any_inference_credential_lists_what_a_request_may_name(
    served: dict,  # noqa: F811
    running: BackgroundCoordinator,
    admin: moerge.Client,
) -> None:
    active, quarantined = served["ids"]
    admin.set_expert_state(quarantined, "quarantined", reason="test")
    trained = admin.train_router("centroid")
    composed = list(admin.compose("reviews", REVIEWS, budget=2))[-1]
    key = admin.create_api_key(note="models").api_key
    with moerge.Client(running.address, token=key) as user:
        models = user.models()
        with pytest.raises(moerge.MoergeError) as refused:
            user.list_experts()
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert [(e.expert_id, e.name, e.task_name, e.label_names) for e in models.experts] == [
        (active, "expert0", "t0", ("neg", "pos"))
    ]  # the quarantined expert is not listed
    assert models.experts[0].created_at is not None and models.experts[0].contributor_id
    assert [(r.method, r.version) for r in models.routers] == [("centroid", trained.version)]
    assert (models.active_router_method, models.active_router_version) == (
        "centroid",
        trained.version,
    )
    assert [(c.name, c.version) for c in models.compositions] == [("reviews", composed.version)]
    assert models.to_dict()["experts"][0]["version"] == 1  # numbers stay numbers


def test_every_method_that_takes_an_id_takes_a_unique_prefix(
    served: dict,  # noqa: F811
    running: BackgroundCoordinator,
    admin: moerge.Client,
) -> None:
    first, second = served["ids"]
    assert admin.get_expert(first[:6]).expert_id == first
    assert admin.set_expert_state(second[:7], "retired").state == "retired"
    contributor = admin.list_contributors().items[0].contributor_id
    owned = admin.list_experts(contributor=contributor[:5]).items
    assert {e.expert_id for e in owned} == {first, second}
    predicted = admin.predict(["hello"], experts=[first[:8]])
    assert [e.expert_id for e in predicted.predictions[0].experts] == [first]
    assert [e.expert_id for e in admin.route(["hello"], experts=[first[:8]]).decisions[0]] == [
        first
    ]
    composed = list(admin.compose("pinned", REVIEWS, experts=[first[:9]], budget=1))[-1]
    assert [e.expert_id for e in composed.experts] == [first]

    key = admin.create_api_key(note="prefixes")
    token = admin.create_enrollment_token(note="prefixes")
    assert admin.revoke_api_key(key.key.key_id[:5]).revoked
    assert admin.revoke_enrollment_token(token.token_id[:5]).revoked
    assert admin.revoke_contributor(contributor[:6]).contributor_id == contributor

    with pytest.raises(moerge.MoergeError, match="no expert id starts with 'zzz'") as missing:
        admin.get_expert("zzz")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    unknown = "0" * 32  # a complete id is sent as is: the coordinator answers for it
    with pytest.raises(moerge.MoergeError, match="not found") as absent:
        admin.get_expert(unknown)
    assert absent.value.code == grpc.StatusCode.NOT_FOUND


def test_a_user_key_resolves_prefixes_among_the_active_experts(
    served: dict,  # noqa: F811
    running: BackgroundCoordinator,
    admin: moerge.Client,
) -> None:
    first, _ = served["ids"]
    key = admin.create_api_key(note="user prefixes").api_key
    with moerge.Client(running.address, token=key) as user:
        assert user.resolve_expert_id(first[:6]) == first
        predicted = user.predict(["hello"], experts=[first[:6]])
    assert [e.expert_id for e in predicted.predictions[0].experts] == [first]


def test_the_async_client_resolves_the_same_prefixes(
    served: dict,  # noqa: F811
    running: BackgroundCoordinator,
) -> None:
    first, second = served["ids"]

    async def calls() -> tuple[str, str, list[str], int]:
        async with moerge.AsyncClient(running.address, token=running.admin_token()) as client:
            expert = await client.get_expert(second[:6])
            resolved = await client.resolve_expert_id(first[:6])
            routed = await client.route(["hello"], experts=[first[:6]])
            models = await client.models()
        return (
            expert.expert_id,
            resolved,
            [e.expert_id for e in routed.decisions[0]],
            len(models.experts),
        )

    assert asyncio.run(calls()) == (second, first, [first], 2)
