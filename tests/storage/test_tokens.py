"""Token format, parsing and secret hashing."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moerge.storage.tokens import (
    ADMIN_PREFIX,
    PREFIXES,
    hash_secret,
    new_token,
    parse_token,
    secret_matches,
)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_new_token_round_trips_through_parse_token(prefix: str) -> None:
    token_id, token = new_token(prefix)
    parsed = parse_token(token)
    assert parsed is not None
    assert parsed[:2] == (prefix, token_id)
    assert len(token_id) == 16
    assert len(parsed[2]) >= 43


def test_new_tokens_are_unique() -> None:
    assert len({new_token(ADMIN_PREFIX)[1] for _ in range(100)}) == 100


def test_new_token_refuses_unknown_prefix() -> None:
    with pytest.raises(ValueError, match="prefix"):
        new_token("xyz")


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "mga",
        "mga__",
        "mgx_0123456789abcdef_" + "a" * 43,  # unknown prefix
        "mga_0123456789ABCDEF_" + "a" * 43,  # upper-case token id
        "mga_0123456789abcde_" + "a" * 43,  # token id too short
        "mga_0123456789abcdef_" + "a" * 31,  # secret too short
        "mga_0123456789abcdef_" + "a" * 43 + "\n",
        "mga_0123456789abcdef_" + "a" * 42 + "!",
        "mga_0123456789abcdef_" + "a" * 300,
        " mga_0123456789abcdef_" + "a" * 43,
        None,
        42,
        b"mga_0123456789abcdef_" + b"a" * 43,
    ],
)
def test_parse_token_returns_none_for_malformed_tokens(garbage: object) -> None:
    assert parse_token(garbage) is None


@given(st.one_of(st.text(max_size=300), st.binary(max_size=64), st.integers(), st.none()))
def test_parse_token_never_raises(garbage: object) -> None:
    parsed = parse_token(garbage)
    assert parsed is None or parsed[0] in PREFIXES


def test_hash_secret_is_sha256_hex() -> None:
    assert hash_secret("s3cret") == hashlib.sha256(b"s3cret").hexdigest()


def test_secret_matches_only_the_right_secret() -> None:
    stored = hash_secret("right")
    assert secret_matches("right", stored)
    assert not secret_matches("wrong", stored)
    assert not secret_matches("right", "not a hash")
