"""User API keys (the inference-only role) and enrollment token listing, SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, update

from moerge.refusals import FailedPrecondition, InvalidArgument, NotFound
from moerge.storage.models import ApiKey
from moerge.storage.registry import Registry, utcnow
from moerge.storage.tokens import hash_secret, parse_token
from tests.storage.helpers import ADMIN


def test_an_api_key_authenticates_as_a_user_with_its_own_rate_limit(registry: Registry) -> None:
    info, key = registry.create_api_key(ADMIN, note="dashboard", rate_limit_per_minute=30)
    assert key.startswith("mgu_") and info.note == "dashboard" and info.expires_at is None
    principal = registry.authenticate(key)
    assert principal is not None
    assert (principal.role, principal.credential_id) == ("user", info.id)
    assert principal.contributor_id is None and principal.rate_limit_per_minute == 30
    (listed,) = registry.list_api_keys().items
    assert listed.id == info.id and listed.last_used_at is not None


def test_only_the_hash_of_an_api_key_is_stored(registry: Registry, engine: Engine) -> None:
    _, key = registry.create_api_key(ADMIN)
    parsed = parse_token(key)
    assert parsed is not None
    with engine.connect() as connection:
        stored = connection.execute(ApiKey.__table__.select()).one()
    assert stored.secret_hash == hash_secret(parsed[2]) and parsed[2] not in tuple(stored)


def test_a_revoked_or_expired_api_key_no_longer_authenticates(
    registry: Registry, engine: Engine
) -> None:
    revoked, revoked_key = registry.create_api_key(ADMIN)
    assert registry.revoke_api_key(ADMIN, revoked.id).revoked_at is not None
    assert registry.authenticate(revoked_key) is None
    with pytest.raises(FailedPrecondition):
        registry.revoke_api_key(ADMIN, revoked.id)
    with pytest.raises(NotFound):
        registry.revoke_api_key(ADMIN, "0" * 16)

    expiring, expiring_key = registry.create_api_key(ADMIN, ttl_seconds=3600)
    assert expiring.expires_at is not None
    principal = registry.authenticate(expiring_key)
    assert principal is not None and principal.expires_at == expiring.expires_at
    with engine.begin() as connection:
        connection.execute(
            update(ApiKey).where(ApiKey.id == expiring.id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )  # fmt: skip
    assert registry.authenticate(expiring_key) is None
    assert {k.id for k in registry.list_api_keys(include_revoked=False).items} == {expiring.id}


def test_a_wrong_secret_or_a_user_key_id_under_another_prefix_is_refused(
    registry: Registry,
) -> None:
    _, key = registry.create_api_key(ADMIN)
    assert registry.authenticate(key[:-4] + "AAAA") is None
    assert registry.authenticate(key.replace("mgu_", "mgc_", 1)) is None
    with pytest.raises(InvalidArgument):
        registry.create_api_key(ADMIN, rate_limit_per_minute=0)


def test_enrollment_tokens_are_listed_oldest_first_and_can_be_revoked(registry: Registry) -> None:
    first, _ = registry.create_enrollment_token(ADMIN, note="a", ttl_seconds=86400)
    second, _ = registry.create_enrollment_token(ADMIN, note="b")
    page = registry.list_enrollment_tokens(page_size=1)
    assert [t.id for t in page.items] == [first.id] and page.next_page_token
    rest = registry.list_enrollment_tokens(page_size=1, page_token=page.next_page_token)
    assert [t.id for t in rest.items] == [second.id]
    registry.revoke_enrollment_token(ADMIN, first.id)
    assert [t.id for t in registry.list_enrollment_tokens(include_revoked=False).items] == [
        second.id
    ]
