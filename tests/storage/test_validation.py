"""Checks on user-supplied strings and numbers."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moerge.refusals import InvalidArgument
from moerge.storage.validation import (
    check_id,
    check_int,
    check_json_object,
    check_name,
    check_page_size,
    check_seconds,
    check_text,
)


@pytest.mark.parametrize("name", ["alice", "Team Ø-1", "expert_v2.1", "a" * 128, "日本語"])
def test_check_name_accepts_ordinary_names(name: str) -> None:
    assert check_name("name", name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a/b",
        "a\\b",
        "..",
        "a..b",
        ".",
        "nul\x00",
        "bell\x07",
        "bidi\u202eoverride",
        "zero\u200bwidth",
        "line\u2028sep",
        " leading",
        "trailing ",
        "tab\t",
        "a" * 129,
        42,
        None,
    ],
)
def test_check_name_refuses_unsafe_names_naming_the_field(name: object) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_name("expert_name", name)
    assert raised.value.field == "expert_name"
    assert "expert_name" in str(raised.value)


@given(st.text(max_size=200))
def test_check_name_either_accepts_or_raises_invalid_argument(name: str) -> None:
    try:
        accepted = check_name("name", name)
    except InvalidArgument:
        return
    assert accepted == name
    assert "/" not in accepted and ".." not in accepted


def test_check_text_allows_newlines_and_tabs_but_no_other_controls() -> None:
    assert check_text("note", "line one\n\tline two", 100) == "line one\n\tline two"
    for bad in ["carriage\rreturn", "nul\x00", "escape\x1b[31m"]:
        with pytest.raises(InvalidArgument, match="note"):
            check_text("note", bad, 100)
    with pytest.raises(InvalidArgument, match="note"):
        check_text("note", "two\nlines", 100, multiline=False)
    with pytest.raises(InvalidArgument, match="at most 3"):
        check_text("note", "four", 3)


def test_check_page_size_bounds() -> None:
    assert check_page_size(1) == 1
    assert check_page_size(1000) == 1000
    for bad in [0, -1, 1001, True, 2.0, "10"]:
        with pytest.raises(InvalidArgument, match="page_size"):
            check_page_size(bad)


def test_check_int_and_check_seconds_refuse_bools_and_non_finite_numbers() -> None:
    with pytest.raises(InvalidArgument, match="count"):
        check_int("count", True, minimum=0)
    assert check_seconds("ttl", 1) == 1.0
    for bad in [math.nan, math.inf, -1, "5", False]:
        with pytest.raises(InvalidArgument, match="ttl"):
            check_seconds("ttl", bad)
    with pytest.raises(InvalidArgument, match="positive"):
        check_seconds("ttl", 0, allow_zero=False)


def test_check_id_wants_32_lowercase_hex() -> None:
    assert check_id("expert_id", "0" * 32) == "0" * 32
    for bad in ["0" * 31, "A" * 32, "../" + "0" * 29, 7]:
        with pytest.raises(InvalidArgument, match="expert_id"):
            check_id("expert_id", bad)


def test_check_json_object_normalises_and_refuses_what_json_cannot_hold() -> None:
    assert check_json_object("params", {"k": (1, 2)}) == {"k": [1, 2]}
    for bad in [[1, 2], {"x": math.nan}, {"x": object()}, "{}"]:
        with pytest.raises(InvalidArgument, match="params"):
            check_json_object("params", bad)
