"""Admin credentials, enrollment, joining and revoking contributors."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, update

from moerge.refusals import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from moerge.storage.blobstore import BlobStore
from moerge.storage.models import Credential, EnrollmentToken
from moerge.storage.records import Principal
from moerge.storage.registry import Registry, utcnow
from moerge.storage.tokens import new_token, parse_token
from tests.storage.helpers import ADMIN, new_expert


def token_id_of(token: str) -> str:
    parsed = parse_token(token)
    assert parsed is not None
    return parsed[1]


def test_no_admin_credential_until_one_is_created(registry: Registry) -> None:
    assert not registry.has_admin_credential()
    token = registry.create_admin_credential("system")
    assert registry.has_admin_credential()
    assert token.startswith("mga_")
    assert registry.authenticate(token) == Principal("admin", None, token_id_of(token))


def test_import_admin_token_is_idempotent(registry: Registry) -> None:
    _, token = new_token("mga")
    assert registry.import_admin_token(token, "system") == token_id_of(token)
    assert registry.import_admin_token(token, "system") == token_id_of(token)
    assert registry.authenticate(token) == Principal("admin", None, token_id_of(token))
    assert len(registry.list_audit(action="credential.import").items) == 1


def test_import_admin_token_refuses_malformed_and_non_admin_tokens(registry: Registry) -> None:
    for bad in ["hunter2", "mga_short_secret", new_token("mgc")[1], new_token("mge")[1]]:
        with pytest.raises(InvalidArgument, match="token"):
            registry.import_admin_token(bad, "system")
    assert not registry.has_admin_credential()


def test_import_admin_token_refuses_another_secret_for_a_known_id(registry: Registry) -> None:
    token_id, token = new_token("mga")
    registry.import_admin_token(token, "system")
    impostor = f"mga_{token_id}_{'x' * 43}"
    with pytest.raises(AlreadyExists, match=token_id):
        registry.import_admin_token(impostor, "system")
    assert registry.authenticate(impostor) is None


def test_a_revoked_admin_token_stays_revoked_when_imported_again(registry: Registry) -> None:
    _, token = new_token("mga")
    registry.import_admin_token(token, "system")
    registry.revoke_credential(ADMIN, token_id_of(token))
    registry.import_admin_token(token, "system")
    assert registry.authenticate(token) is None
    assert not registry.has_admin_credential()


def test_authenticate_returns_none_for_malformed_or_unknown_tokens(registry: Registry) -> None:
    registry.create_admin_credential(ADMIN)
    for garbage in ["", "Bearer x", "mga_" + "0" * 16 + "_" + "a" * 43, "\x00" * 10, "é" * 300]:
        assert registry.authenticate(garbage) is None


def test_authenticate_refuses_the_right_id_with_the_wrong_secret(registry: Registry) -> None:
    token = registry.create_admin_credential(ADMIN)
    forged = token[: -len("x" * 5)] + "x" * 5
    assert forged != token
    assert registry.authenticate(forged) is None


def test_a_token_is_only_valid_under_its_own_prefix(registry: Registry) -> None:
    token = registry.create_admin_credential(ADMIN)
    assert registry.authenticate("mgc" + token[3:]) is None
    _, enrollment = registry.create_enrollment_token(ADMIN)
    assert registry.authenticate(enrollment) is None
    assert registry.authenticate("mgc" + enrollment[3:]) is None


def test_revoked_credentials_do_not_authenticate(registry: Registry) -> None:
    token = registry.create_admin_credential(ADMIN)
    registry.revoke_credential(ADMIN, token_id_of(token))
    assert registry.authenticate(token) is None
    with pytest.raises(FailedPrecondition, match="already revoked"):
        registry.revoke_credential(ADMIN, token_id_of(token))
    with pytest.raises(NotFound):
        registry.revoke_credential(ADMIN, "0" * 16)


def test_authenticate_records_last_use_at_most_once_a_minute(
    registry: Registry, engine: Engine
) -> None:
    token = registry.create_admin_credential(ADMIN)
    credential_id = token_id_of(token)

    def last_used() -> datetime | None:
        with engine.connect() as connection:
            return connection.scalar(
                Credential.__table__.select()
                .with_only_columns(Credential.last_used_at)
                .where(Credential.id == credential_id)
            )

    assert last_used() is None
    registry.authenticate(token)
    first = last_used()
    assert first is not None
    registry.authenticate(token)
    assert last_used() == first
    an_hour_ago = utcnow() - timedelta(hours=1)
    with engine.begin() as connection:
        connection.execute(
            update(Credential)
            .where(Credential.id == credential_id)
            .values(last_used_at=an_hour_ago)
        )
    registry.authenticate(token)
    refreshed = last_used()
    assert refreshed is not None and refreshed > an_hour_ago


def test_join_creates_a_contributor_with_a_working_credential(registry: Registry) -> None:
    token_info, enrollment = registry.create_enrollment_token(ADMIN, note="for the NLP lab")
    assert token_info.uses == 0 and token_info.max_uses == 1
    assert token_info.created_by == ADMIN
    contributor, credential = registry.join(enrollment, "nlp-lab")
    assert contributor.name == "nlp-lab"
    assert len(contributor.id) == 32
    assert contributor.created_at.tzinfo is not None
    assert contributor.revoked_at is None
    principal = registry.authenticate(credential)
    assert principal == Principal("contributor", contributor.id, token_id_of(credential))
    assert registry.get_contributor(contributor.id) == contributor
    assert registry.get_enrollment_token(token_info.id).uses == 1


def test_join_refuses_unknown_and_malformed_enrollment_tokens(registry: Registry) -> None:
    admin = registry.create_admin_credential(ADMIN)
    _, enrollment = registry.create_enrollment_token(ADMIN)
    for bad in ["", "garbage", admin, new_token("mge")[1], enrollment[:-3] + "abc"]:
        with pytest.raises(Unauthenticated):
            registry.join(bad, "mallory")
    assert registry.list_contributors().items == ()


def test_join_refuses_an_expired_enrollment_token(registry: Registry, engine: Engine) -> None:
    info, enrollment = registry.create_enrollment_token(ADMIN, ttl_seconds=3600)
    assert info.expires_at is not None
    assert timedelta(minutes=59) < info.expires_at - info.created_at <= timedelta(hours=1)
    with engine.begin() as connection:
        connection.execute(
            update(EnrollmentToken)
            .where(EnrollmentToken.id == info.id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    with pytest.raises(Unauthenticated, match="expired"):
        registry.join(enrollment, "late")


def test_join_refuses_an_exhausted_enrollment_token(registry: Registry) -> None:
    info, enrollment = registry.create_enrollment_token(ADMIN, max_uses=2)
    registry.join(enrollment, "first")
    registry.join(enrollment, "second")
    with pytest.raises(Unauthenticated, match="used up"):
        registry.join(enrollment, "third")
    assert registry.get_enrollment_token(info.id).uses == 2


def test_join_refuses_a_revoked_enrollment_token(registry: Registry) -> None:
    info, enrollment = registry.create_enrollment_token(ADMIN)
    assert registry.revoke_enrollment_token(ADMIN, info.id).revoked_at is not None
    with pytest.raises(Unauthenticated, match="revoked"):
        registry.join(enrollment, "too-late")


def test_join_refuses_a_taken_name_without_using_up_the_token(registry: Registry) -> None:
    _, first = registry.create_enrollment_token(ADMIN)
    registry.join(first, "alice")
    info, second = registry.create_enrollment_token(ADMIN)
    with pytest.raises(AlreadyExists, match="alice"):
        registry.join(second, "alice")
    assert registry.get_enrollment_token(info.id).uses == 0
    assert registry.join(second, "alice-2")[0].name == "alice-2"


def test_join_refuses_bad_names(registry: Registry) -> None:
    _, enrollment = registry.create_enrollment_token(ADMIN)
    for name in [
        "",
        "../etc",
        "a/b",
        " padded",
        "ctl\x1b",
        "x" * 129,
        "x;DROP TABLE contributors",
        "<b>",
        "a'b",
    ]:
        with pytest.raises(InvalidArgument) as raised:
            registry.join(enrollment, name)
        assert raised.value.field == "name"
    assert registry.list_contributors().items == ()


def test_create_enrollment_token_refuses_bad_arguments(registry: Registry) -> None:
    with pytest.raises(InvalidArgument, match="max_uses"):
        registry.create_enrollment_token(ADMIN, max_uses=0)
    with pytest.raises(InvalidArgument, match="ttl_seconds"):
        registry.create_enrollment_token(ADMIN, ttl_seconds=-5)
    with pytest.raises(InvalidArgument, match="note"):
        registry.create_enrollment_token(ADMIN, note="\x00")
    with pytest.raises(InvalidArgument, match="actor"):
        registry.create_enrollment_token("")


def test_revoking_a_contributor_revokes_its_credentials_but_keeps_its_experts(
    registry: Registry, blobs: BlobStore
) -> None:
    _, enrollment = registry.create_enrollment_token(ADMIN)
    contributor, credential = registry.join(enrollment, "bob")
    expert, _ = registry.register_expert(ADMIN, contributor.id, new_expert(blobs))
    revoked = registry.revoke_contributor(ADMIN, contributor.id, "leaked token")
    assert revoked.revoked_at is not None
    assert revoked.revoke_reason == "leaked token"
    assert registry.authenticate(credential) is None
    assert registry.get_expert(expert.id).state == "active"
    with pytest.raises(FailedPrecondition, match="already revoked"):
        registry.revoke_contributor(ADMIN, contributor.id, "again")


def test_get_contributor_refuses_unknown_and_malformed_ids(registry: Registry) -> None:
    with pytest.raises(NotFound):
        registry.get_contributor("0" * 32)
    with pytest.raises(InvalidArgument, match="contributor_id"):
        registry.get_contributor("../../x")


def test_list_contributors_pages_oldest_first_and_can_hide_revoked(registry: Registry) -> None:
    _, enrollment = registry.create_enrollment_token(ADMIN, max_uses=5)
    joined = [registry.join(enrollment, f"member-{i}")[0] for i in range(5)]
    registry.revoke_contributor(ADMIN, joined[1].id, "left")

    seen = []
    page = registry.list_contributors(page_size=2)
    while True:
        assert len(page.items) <= 2
        seen.extend(page.items)
        if page.next_page_token is None:
            break
        page = registry.list_contributors(page_size=2, page_token=page.next_page_token)
    assert [c.name for c in seen] == [f"member-{i}" for i in range(5)]

    active = registry.list_contributors(include_revoked=False).items
    assert [c.name for c in active] == ["member-0", "member-2", "member-3", "member-4"]


def test_join_accepts_the_names_the_protocol_documents(registry: Registry) -> None:
    """JoinRequest.name: letters, digits, '-', '_', '.' and spaces inside."""
    _, enrollment = registry.create_enrollment_token(ADMIN, max_uses=3)
    for name in ["Lab-7_b.v2", "Team Ø 1", "研究室"]:
        assert registry.join(enrollment, name)[0].name == name
