"""Reads R's binary serialization (XDR) so data shipped in R packages is usable without R.

Only plain data is understood: NULL, logical/integer/double/character/raw vectors, lists,
pairlists (attributes), symbols, references to symbols and the ALTREP compact sequences and
wrappers that R >= 3.5 writes. Anything else (closures, environments, bytecode, external
pointers, S4 objects, ...) is refused with :class:`RDataError`. Nothing is evaluated and nothing
is unpickled: the reader only decodes numbers and strings.

Three containers are supported:

* ``.rds`` files (``saveRDS``): a gzip, bzip2 or xz file (or no compression) around one object;
* R's lazy-load databases (``data/Rdata.rdb`` + ``Rdata.rdx``): the ``.rdx`` is an ``.rds``
  file holding ``list(variables = list(name = c(offset, length), ...), ...)`` and each object in
  the ``.rdb`` is a 4-byte big-endian uncompressed length, then either a zlib stream or a type
  byte (``'Z'`` xz/LZMA2, ``'2'`` bzip2, ``'1'`` zlib, ``'0'`` none) and the payload.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RDataError",
    "RSymbol",
    "RVector",
    "data_frame_columns",
    "lazy_load_names",
    "parse",
    "read_lazy_load_object",
    "read_rds",
]

# SEXP type codes (R's Rinternals.h) and serialization pseudo-types (serialize.c).
SYMSXP, LISTSXP, CHARSXP = 1, 2, 9
LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP = 10, 13, 14, 15, 16
VECSXP, EXPRSXP, RAWSXP = 19, 20, 24
ALTREP_SXP, REFSXP, NILVALUE_SXP = 238, 255, 254
SPECIAL_VALUES = {
    253: "R_GlobalEnv",
    252: "R_UnboundValue",
    251: "R_MissingArg",
    250: "R_BaseNamespace",
    242: "R_EmptyEnv",
    241: "R_BaseEnv",
}
TYPE_NAMES = {
    0: "NILSXP",
    1: "SYMSXP",
    2: "LISTSXP",
    3: "CLOSXP",
    4: "ENVSXP",
    5: "PROMSXP",
    6: "LANGSXP",
    7: "SPECIALSXP",
    8: "BUILTINSXP",
    9: "CHARSXP",
    10: "LGLSXP",
    13: "INTSXP",
    14: "REALSXP",
    15: "CPLXSXP",
    16: "STRSXP",
    17: "DOTSXP",
    18: "ANYSXP",
    19: "VECSXP",
    20: "EXPRSXP",
    21: "BCODESXP",
    22: "EXTPTRSXP",
    23: "WEAKREFSXP",
    24: "RAWSXP",
    25: "S4SXP",
    238: "ALTREP_SXP",
    239: "ATTRLISTSXP",
    240: "ATTRLANGSXP",
    243: "BCREPREF",
    244: "BCREPDEF",
    245: "GENERICREFSXP",
    246: "CLASSREFSXP",
    247: "PERSISTSXP",
    248: "PACKAGESXP",
    249: "NAMESPACESXP",
}
VECTOR_KINDS = {
    LGLSXP: "logical",
    INTSXP: "integer",
    REALSXP: "double",
    CPLXSXP: "complex",
    STRSXP: "character",
    VECSXP: "list",
    EXPRSXP: "expression",
    RAWSXP: "raw",
}

HAS_ATTR_BIT, HAS_TAG_BIT = 1 << 9, 1 << 10
# Encoding flags of a CHARSXP, stored in the "levels" part (bits 12+) of its flags.
LATIN1_MASK, UTF8_MASK, BYTES_MASK, ASCII_MASK = 1 << 2, 1 << 3, 1 << 1, 1 << 6
NA_INTEGER = -(2**31)
NA_REAL_LOW_WORD = 1954  # R's NA_real_ is a NaN whose low 32 bits are 1954.
MAX_DEPTH = 1000
MAX_UNCOMPRESSED_BYTES = 1 << 31


class RDataError(ValueError):
    """The bytes are not R serialization this reader understands."""


@dataclass(frozen=True)
class RSymbol:
    """An R symbol (a name), as found in pairlist tags and ALTREP class descriptions."""

    name: str


@dataclass
class RVector:
    """An R vector: ``kind`` is R's ``typeof`` and NA values are ``None``.

    ``attributes`` holds R attributes by name (``names``, ``class``, ``levels``, ...).
    Pairlists read as ``kind="pairlist"`` with their tags (or ``None``) in ``attributes["names"]``.
    """

    kind: str
    values: list[Any]
    attributes: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def names(self) -> list[str | None] | None:
        """The ``names`` attribute as a plain list, if there is one."""
        names = self.attributes.get("names")
        return names.values if isinstance(names, RVector) else None

    @property
    def classes(self) -> list[str]:
        """The ``class`` attribute as a plain list (empty when unset)."""
        classes = self.attributes.get("class")
        return [c for c in classes.values if c] if isinstance(classes, RVector) else []

    def get(self, name: str) -> Any:
        """The element named ``name`` (lists and pairlists); ``KeyError`` when absent."""
        names = self.names or []
        if name not in names:
            raise KeyError(name)
        return self.values[names.index(name)]


class _Reader:
    """Walks one serialized stream; ``refs`` is R's reference table (1-based in the stream)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []
        self.depth = 0
        self.native_encoding = "UTF-8"

    # -- primitives --------------------------------------------------------------------------
    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise RDataError(f"truncated data: need {n} bytes at offset {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int32(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int32()
        if n == -1:  # long vector: two more ints, upper and lower 32 bits
            upper, lower = struct.unpack(">II", self.take(8))
            n = (upper << 32) + lower
        if n < 0:
            raise RDataError(f"negative vector length {n} at offset {self.pos}")
        return n

    def ints(self, n: int) -> list[int | None]:
        values = struct.unpack(f">{n}i", self.take(4 * n))
        return [None if v == NA_INTEGER else v for v in values]

    def doubles(self, n: int) -> list[float | None]:
        raw = self.take(8 * n)
        values: list[float | None] = list(struct.unpack(f">{n}d", raw))
        for i, v in enumerate(values):
            if v is not None and math.isnan(v):
                low_word = struct.unpack(">I", raw[8 * i + 4 : 8 * i + 8])[0]
                if low_word == NA_REAL_LOW_WORD:
                    values[i] = None
        return values

    # -- stream ------------------------------------------------------------------------------
    def header(self) -> None:
        magic = self.take(2)
        if magic != b"X\n":
            kinds = {b"A\n": "ASCII", b"B\n": "native binary", b"RD": "an .RData save file"}
            found = kinds.get(magic, repr(magic))
            raise RDataError(f"not XDR R serialization (format {found}); only XDR is supported")
        version = self.int32()
        self.int32()  # version of R that wrote it
        self.int32()  # minimal version of R needed to read it
        if version == 3:
            self.native_encoding = self.take(self.int32()).decode("ascii", "replace")
        elif version != 2:
            raise RDataError(f"unsupported serialization version {version} (2 and 3 are)")

    def item(self) -> Any:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise RDataError(f"objects nested deeper than {MAX_DEPTH} levels")
        try:
            return self.item_with_flags(self.int32())
        finally:
            self.depth -= 1

    def item_with_flags(self, flags: int) -> Any:
        sexp_type = flags & 0xFF
        has_attr = bool(flags & HAS_ATTR_BIT)
        if sexp_type == NILVALUE_SXP:
            return None
        if sexp_type in SPECIAL_VALUES:
            return RSymbol(SPECIAL_VALUES[sexp_type])
        if sexp_type == REFSXP:
            index = flags >> 8 or self.int32()
            if not 1 <= index <= len(self.refs):
                raise RDataError(f"reference {index} to an object not read yet")
            return self.refs[index - 1]
        if sexp_type == SYMSXP:
            symbol = RSymbol(self.item_with_flags(self.int32()) or "")
            self.refs.append(symbol)
            return symbol
        if sexp_type == LISTSXP:
            return self.pairlist(flags)
        if sexp_type == CHARSXP:
            return self.charsxp(flags)
        if sexp_type == ALTREP_SXP:
            return self.altrep()
        if sexp_type in VECTOR_KINDS:
            vector = RVector(VECTOR_KINDS[sexp_type], self.vector_values(sexp_type))
            if has_attr:
                vector.attributes = self.attributes()
            return vector
        name = TYPE_NAMES.get(sexp_type, "unknown")
        raise RDataError(
            f"unsupported R object type {name} ({sexp_type}) at offset {self.pos - 4}; "
            "only data (vectors, lists, factors, data frames) can be read"
        )

    def vector_values(self, sexp_type: int) -> list[Any]:
        n = self.length()
        if sexp_type in (LGLSXP, INTSXP):
            values = self.ints(n)
            if sexp_type == LGLSXP:
                return [None if v is None else bool(v) for v in values]
            return values
        if sexp_type == REALSXP:
            return self.doubles(n)
        if sexp_type == CPLXSXP:
            parts = self.doubles(2 * n)
            return [
                None if re is None or im is None else complex(re, im)
                for re, im in zip(parts[::2], parts[1::2], strict=True)
            ]
        if sexp_type == RAWSXP:
            return list(self.take(n))
        if sexp_type == STRSXP:
            strings = []
            for _ in range(n):
                flags = self.int32()
                if flags & 0xFF != CHARSXP:
                    raise RDataError(f"character vector element of type {flags & 0xFF}")
                strings.append(self.charsxp(flags))
            return strings
        if self.length_is_implausible(n):
            raise RDataError(f"list of {n} elements is longer than the data")
        return [self.item() for _ in range(n)]  # VECSXP, EXPRSXP

    def length_is_implausible(self, n: int) -> bool:
        return n > len(self.data) - self.pos  # every element takes at least one byte

    def charsxp(self, flags: int) -> str | None:
        n = self.int32()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        levels = flags >> 12
        if levels & LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & (UTF8_MASK | ASCII_MASK):
            return raw.decode("utf-8", "replace")
        if levels & BYTES_MASK:
            return raw.decode("latin-1")
        encoding = "latin-1" if "8859-1" in self.native_encoding.upper() else "utf-8"
        return raw.decode(encoding, "replace")

    def pairlist(self, flags: int) -> RVector:
        """Reads a chain of LISTSXP cells iteratively (pairlists can be long)."""
        tags: list[str | None] = []
        values: list[Any] = []
        while flags & 0xFF == LISTSXP:
            if flags & HAS_ATTR_BIT:
                self.item()  # attributes of a pairlist cell: not used for data
            tag = self.item() if flags & HAS_TAG_BIT else None
            tags.append(tag.name if isinstance(tag, RSymbol) else None)
            values.append(self.item())
            flags = self.int32()
        tail = self.item_with_flags(flags)
        if tail is not None:  # a dotted pair, as ALTREP wrappers use: keep the tail as last value
            tags.append(None)
            values.append(tail)
        return RVector("pairlist", values, {"names": RVector("character", tags)})

    def attributes(self) -> dict[str, Any]:
        attributes = self.item()
        if not isinstance(attributes, RVector) or attributes.kind != "pairlist":
            raise RDataError("attributes are not a pairlist")
        names = attributes.names or []
        return {str(name): value for name, value in zip(names, attributes.values, strict=True)}

    def altrep(self) -> RVector:
        """Expands the ALTREP classes R writes for plain data; other classes are refused."""
        info = self.item()
        state = self.item()
        attributes = self.item()
        class_name = info.values[0].name if isinstance(info, RVector) and info.values else "?"
        if class_name in ("compact_intseq", "compact_realseq"):
            n, start, step = state.values
            values = [start + i * step for i in range(int(n))]
            if class_name == "compact_intseq":
                values = [int(v) for v in values]
            vector = RVector("integer" if class_name == "compact_intseq" else "double", values)
        elif class_name.startswith("wrap_"):
            vector = state.values[0]  # state is the dotted pair (wrapped vector . metadata)
            if not isinstance(vector, RVector):
                raise RDataError(f"ALTREP {class_name} wraps a non-vector")
        else:
            raise RDataError(f"unsupported ALTREP class {class_name!r}")
        if isinstance(attributes, RVector) and attributes.kind == "pairlist":
            names = attributes.names or []
            vector.attributes = dict(zip(map(str, names), attributes.values, strict=True))
        return vector


def parse(data: bytes) -> Any:
    """Decodes one uncompressed XDR stream (starting with ``X\\n``) into Python objects.

    NULL becomes ``None``, vectors and lists :class:`RVector`, symbols :class:`RSymbol`; the
    markers R writes for its global, base and empty environments read as symbols of their names
    (``RSymbol("R_GlobalEnv")``), as nothing here needs the environments themselves.
    """
    reader = _Reader(data)
    reader.header()
    result = reader.item()
    if reader.pos != len(data):
        raise RDataError(f"{len(data) - reader.pos} unexpected bytes after the object")
    return result


def read_rds(path: str | Path) -> Any:
    """Reads an ``.rds`` file (as written by ``saveRDS``), whatever its compression."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    elif raw[:3] == b"BZh":
        raw = bz2.decompress(raw)
    elif raw[:6] == b"\xfd7zXZ\x00":
        raw = lzma.decompress(raw)
    return parse(raw)


def _decompress_lazy_load_blob(blob: bytes) -> bytes:
    """Undoes R_compress1/2/3: a 4-byte big-endian length, then the compressed payload."""
    if len(blob) < 5:
        raise RDataError("lazy-load entry shorter than its header")
    expected = struct.unpack(">I", blob[:4])[0]
    if expected > MAX_UNCOMPRESSED_BYTES:
        raise RDataError(f"lazy-load entry claims {expected} bytes uncompressed; refusing")
    kind, payload = blob[4:5], blob[5:]
    if kind == b"Z":
        filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=filters)
        raw = decompressor.decompress(payload, max_length=expected)
    elif kind == b"2":
        raw = bz2.BZ2Decompressor().decompress(payload)
    elif kind == b"1":
        raw = zlib.decompressobj().decompress(payload, expected)
    elif kind == b"0":
        raw = payload
    else:  # R_compress1: a plain zlib stream straight after the length
        raw = zlib.decompressobj().decompress(blob[4:], expected)
    if len(raw) != expected:
        raise RDataError(f"lazy-load entry decompressed to {len(raw)} bytes, not {expected}")
    return raw


def _lazy_load_index(rdx_path: Path) -> dict[str, tuple[int, int]]:
    index = read_rds(rdx_path)
    if not isinstance(index, RVector):
        raise RDataError(f"{rdx_path} is not a lazy-load index")
    variables = index.get("variables")
    return {
        str(name): (int(key.values[0]), int(key.values[1]))
        for name, key in zip(variables.names or [], variables.values, strict=True)
    }


def lazy_load_names(rdb_path: str | Path) -> list[str]:
    """Names of the objects in a lazy-load database (``.rdb`` with its ``.rdx`` alongside)."""
    return sorted(_lazy_load_index(Path(rdb_path).with_suffix(".rdx")))


def read_lazy_load_object(rdb_path: str | Path, name: str) -> Any:
    """Reads object ``name`` from a lazy-load database such as a package's ``data/Rdata.rdb``."""
    rdb_path = Path(rdb_path)
    index = _lazy_load_index(rdb_path.with_suffix(".rdx"))
    if name not in index:
        raise KeyError(f"{name!r} is not in {rdb_path}; it holds {sorted(index)}")
    offset, length = index[name]
    with rdb_path.open("rb") as handle:
        handle.seek(offset)
        blob = handle.read(length)
    if len(blob) != length:
        raise RDataError(f"{rdb_path} is truncated: {name!r} needs {length} bytes at {offset}")
    return parse(_decompress_lazy_load_blob(blob))


def _factor_labels(vector: RVector) -> list[str | None]:
    levels = vector.attributes["levels"].values
    return [None if code is None else levels[code - 1] for code in vector.values]


def data_frame_columns(frame: Any) -> dict[str, list[Any]]:
    """The columns of an R data frame (or tibble) as plain lists; factors become their labels."""
    if not isinstance(frame, RVector) or "data.frame" not in frame.classes:
        raise RDataError("object is not a data frame")
    columns = {}
    for name, column in zip(frame.names or [], frame.values, strict=True):
        if not isinstance(column, RVector):
            raise RDataError(f"column {name!r} is not a vector")
        is_factor = "factor" in column.classes and "levels" in column.attributes
        columns[str(name)] = _factor_labels(column) if is_factor else column.values
    return columns
