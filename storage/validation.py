"""Checks on user-supplied values, so that bad input is refused before it reaches SQL or a path.

Each function returns the value it accepted and raises ``InvalidArgument`` naming the field.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any

from moerge.refusals import InvalidArgument

MAX_PAGE_SIZE = 1000
MAX_JSON_BYTES = 1 << 20
#: The largest value of an ``Integer`` column (PostgreSQL's int4; SQLite would store more).
MAX_INT32 = 2**31 - 1

_HEX_ID_RE = re.compile(r"[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

# Cc: control, Cf: format (bidi overrides, zero-width), Cs: lone surrogates (not encodable),
# Zl/Zp: line and paragraph separators.
_NAME_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_TEXT_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs"})
_TEXT_ALLOWED_CONTROLS = frozenset({"\n", "\t"})


def _require_str(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(field, f"must be a string, not {type(value).__name__}")
    return value


def check_name(field: str, value: object, max_len: int = 128) -> str:
    """A short identifier that may end up in a path or a log line: one visible, trimmed word."""
    name = _require_str(field, value)
    if not name:
        raise InvalidArgument(field, "must not be empty")
    if len(name) > max_len:
        raise InvalidArgument(field, f"must be at most {max_len} characters")
    if "/" in name or "\\" in name:
        raise InvalidArgument(field, "must not contain path separators")
    if ".." in name or name == ".":
        raise InvalidArgument(field, "must not contain '..' or be '.'")
    if name != name.strip():
        raise InvalidArgument(field, "must not start or end with whitespace")
    for char in name:
        if unicodedata.category(char) in _NAME_FORBIDDEN_CATEGORIES:
            raise InvalidArgument(field, f"must not contain control characters ({char!r})")
    return name


def check_contributor_name(field: str, value: object, max_len: int = 128) -> str:
    """A contributor's name, as the ``JoinRequest.name`` comment promises: letters, digits,
    ``-``, ``_``, ``.`` and spaces inside (it is shown to admins and written in the audit log)."""
    name = check_name(field, value, max_len)
    bad = sorted({c for c in name if not (c.isalnum() or c in "-_. ")})
    if bad:
        raise InvalidArgument(
            field, f"may hold letters, digits, '-', '_', '.' and inner spaces only, not {bad}"
        )
    return name


def check_text(field: str, value: object, max_len: int, *, multiline: bool = True) -> str:
    """Free text such as a description: any printable text, newlines and tabs if multiline."""
    text = _require_str(field, value)
    if len(text) > max_len:
        raise InvalidArgument(field, f"must be at most {max_len} characters")
    for char in text:
        if multiline and char in _TEXT_ALLOWED_CONTROLS:
            continue
        if unicodedata.category(char) in _TEXT_FORBIDDEN_CATEGORIES:
            raise InvalidArgument(field, f"must not contain control characters ({char!r})")
    return text


def fits_column(value: object) -> bool:
    """Whether an int fits an ``Integer`` column and a str a text column (no NUL) on PostgreSQL.

    For values that reach a query without a field check, e.g. a page token's key: PostgreSQL
    refuses the query itself (INTERNAL), where SQLite would simply match nothing.
    """
    if isinstance(value, int):
        return -MAX_INT32 - 1 <= value <= MAX_INT32
    if isinstance(value, str):
        return "\x00" not in value
    return True


def check_page_size(value: object, maximum: int = MAX_PAGE_SIZE) -> int:
    """Page sizes are bounded so that one call cannot ask for the whole table."""
    return check_int("page_size", value, minimum=1, maximum=maximum)


def check_int(field: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """An integer (not a bool) within bounds."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(field, f"must be an integer, not {type(value).__name__}")
    if value < minimum:
        raise InvalidArgument(field, f"must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise InvalidArgument(field, f"must be <= {maximum}")
    return value


def check_seconds(field: str, value: object, *, allow_zero: bool = True) -> float:
    """A finite, non-negative duration (positive unless ``allow_zero``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidArgument(field, "must be a finite number of seconds")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument(field, "must be positive" if not allow_zero else "must be >= 0")
    return float(value)


def check_id(field: str, value: object) -> str:
    """A registry id: 32 lowercase hex characters (a uuid4 without dashes)."""
    text = _require_str(field, value)
    if not _HEX_ID_RE.fullmatch(text):
        raise InvalidArgument(field, "must be 32 lowercase hex characters")
    return text


def check_sha256(field: str, value: object) -> str:
    """A SHA-256 digest: 64 lowercase hex characters."""
    text = _require_str(field, value)
    if not _SHA256_RE.fullmatch(text):
        raise InvalidArgument(field, "must be a sha256 digest (64 lowercase hex characters)")
    return text


def check_json_object(field: str, value: object) -> dict[str, Any]:
    """A JSON object, returned as it will read back from the database (tuples become lists).

    NaN and infinities are refused because PostgreSQL's JSON type refuses them.
    """
    if not isinstance(value, dict):
        raise InvalidArgument(field, f"must be a JSON object, not {type(value).__name__}")
    try:
        encoded = json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(field, f"must be JSON-serialisable ({exc})") from None
    if len(encoded.encode("utf-8")) > MAX_JSON_BYTES:
        raise InvalidArgument(field, f"must be at most {MAX_JSON_BYTES} bytes as JSON")
    decoded: dict[str, Any] = json.loads(encoded)
    return decoded


def check_string_list(field: str, value: object, max_items: int, max_len: int) -> list[str]:
    """A list of single-line strings, e.g. label names or LoRA target modules."""
    if not isinstance(value, (list, tuple)):
        raise InvalidArgument(field, f"must be a list of strings, not {type(value).__name__}")
    if len(value) > max_items:
        raise InvalidArgument(field, f"must have at most {max_items} items")
    return [
        check_text(f"{field}[{index}]", item, max_len, multiline=False)
        for index, item in enumerate(value)
    ]
