"""Builds R XDR serialization byte strings by hand, so the reader is tested on known input.

The layout follows R's serialize.c: a header, then each object as a 32-bit flags word (type in
the low byte, then the "is object", "has attributes" and "has tag" bits, levels from bit 12)
followed by its payload. Integers and doubles are big-endian.
"""

from __future__ import annotations

import struct

NA_INTEGER = -(2**31)
NA_REAL = struct.pack(">II", 0x7FF00000, 1954)
NULL = struct.pack(">i", 254)
UTF8, LATIN1, ASCII = 1 << 3, 1 << 2, 1 << 6


def header(version: int = 3) -> bytes:
    out = b"X\n" + struct.pack(">iii", version, 0x040202, 0x030500)
    if version == 3:
        out += struct.pack(">i", 5) + b"UTF-8"
    return out


def flags(sexp_type: int, *, attr: bool = False, tag: bool = False, levels: int = 0) -> bytes:
    value = sexp_type | (1 << 9 if attr else 0) | (1 << 10 if tag else 0) | (levels << 12)
    return struct.pack(">i", value)


def charsxp(text: str | None, encoding: int = UTF8) -> bytes:
    if text is None:
        return flags(9) + struct.pack(">i", -1)
    raw = text.encode("latin-1" if encoding == LATIN1 else "utf-8")
    return flags(9, levels=encoding) + struct.pack(">i", len(raw)) + raw


def symbol(name: str) -> bytes:
    return flags(1) + charsxp(name, ASCII)


def ref(index: int) -> bytes:
    """A reference to the ``index``-th (1-based) symbol read so far."""
    return struct.pack(">i", (index << 8) | 255)


def pairlist(items: list[tuple[bytes | None, bytes]], tail: bytes = NULL) -> bytes:
    """A LISTSXP chain; each item is (serialized tag or None, serialized value)."""
    out = b""
    for tag, value in items:
        out += flags(2, tag=tag is not None) + (tag or b"") + value
    return out + tail


def attributes(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return pairlist([(tag, value) for tag, value in pairs])


def _vector(sexp_type: int, payload: bytes, n: int, attrs: bytes | None) -> bytes:
    return (
        flags(sexp_type, attr=attrs is not None) + struct.pack(">i", n) + payload + (attrs or b"")
    )


def integers(values: list[int | None], attrs: bytes | None = None) -> bytes:
    payload = b"".join(struct.pack(">i", NA_INTEGER if v is None else v) for v in values)
    return _vector(13, payload, len(values), attrs)


def logicals(values: list[bool | None], attrs: bytes | None = None) -> bytes:
    payload = b"".join(struct.pack(">i", NA_INTEGER if v is None else int(v)) for v in values)
    return _vector(10, payload, len(values), attrs)


def doubles(values: list[float | None], attrs: bytes | None = None) -> bytes:
    payload = b"".join(NA_REAL if v is None else struct.pack(">d", v) for v in values)
    return _vector(14, payload, len(values), attrs)


def strings(values: list[str | None], attrs: bytes | None = None, encoding: int = UTF8) -> bytes:
    payload = b"".join(charsxp(v, encoding) for v in values)
    return _vector(16, payload, len(values), attrs)


def generic_list(items: list[bytes], attrs: bytes | None = None) -> bytes:
    return _vector(19, b"".join(items), len(items), attrs)


def altrep(class_name: str, state: bytes, attrs: bytes = NULL) -> bytes:
    """An ALTREP object: class info (class, package, type), its state, then its attributes."""
    info = pairlist([(None, symbol(class_name)), (None, symbol("base")), (None, integers([13]))])
    return struct.pack(">i", 238) + info + state + attrs
