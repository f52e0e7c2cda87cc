"""The R serialization reader: hand-made XDR byte strings, lazy-load databases and real data."""

from __future__ import annotations

import gzip
import lzma
import math
import struct
import zlib
from pathlib import Path

import pytest

from moerge.datasets import default_data_dir, rdata

from . import xdr

MODELDATA_RDB = "debian/r-cran-modeldata/usr/lib/R/site-library/modeldata/data/Rdata.rdb"


def parse(body: bytes, version: int = 3):
    return rdata.parse(xdr.header(version) + body)


def data_frame(columns: dict[str, bytes], n_rows: int) -> bytes:
    """A data.frame as R writes it: a list with names, class and compact row.names attributes."""
    attrs = xdr.attributes(
        [
            (xdr.symbol("names"), xdr.strings(list(columns))),
            (xdr.symbol("class"), xdr.strings(["data.frame"])),
            (xdr.symbol("row.names"), xdr.integers([None, -n_rows])),
        ]
    )
    return xdr.generic_list(list(columns.values()), attrs)


def factor(codes: list[int | None], levels: list[str]) -> bytes:
    attrs = xdr.attributes(
        [
            (xdr.symbol("levels"), xdr.strings(levels)),
            (xdr.symbol("class"), xdr.strings(["factor"])),
        ]
    )
    return xdr.integers(codes, attrs)


def test_integer_vector_with_na_reads_as_ints_and_none():
    vector = parse(xdr.integers([1, None, -7]))
    assert (vector.kind, vector.values) == ("integer", [1, None, -7])


def test_real_vector_tells_na_apart_from_nan():
    values = parse(xdr.doubles([1.5, None, math.nan, -math.inf])).values
    assert values[0] == 1.5
    assert values[1] is None
    assert math.isnan(values[2])
    assert values[3] == -math.inf


def test_logical_vector_reads_as_bools_and_none():
    assert parse(xdr.logicals([True, False, None])).values == [True, False, None]


def test_character_vector_decodes_each_declared_encoding_and_na():
    utf8 = parse(xdr.strings(["café", None]))
    latin1 = parse(xdr.strings(["café"], encoding=xdr.LATIN1))
    assert utf8.values == ["café", None]
    assert latin1.values == ["café"]


def test_null_reads_as_none():
    assert parse(xdr.NULL) is None


def test_version_2_stream_without_native_encoding_is_read():
    assert parse(xdr.integers([4]), version=2).values == [4]


def test_named_list_exposes_names_and_nested_values():
    names = xdr.attributes([(xdr.symbol("names"), xdr.strings(["a", "b"]))])
    value = parse(xdr.generic_list([xdr.integers([1]), xdr.generic_list([xdr.NULL])], names))
    assert value.kind == "list"
    assert value.names == ["a", "b"]
    assert value.get("a").values == [1]
    assert value.get("b").values == [None]


def test_attribute_tags_can_be_references_to_symbols_read_before():
    first = xdr.attributes([(xdr.symbol("names"), xdr.strings(["x"]))])
    second = xdr.attributes([(xdr.ref(1), xdr.strings(["y"]))])  # symbol 1 is "names"
    value = parse(xdr.generic_list([xdr.integers([1], first)], second))
    assert value.names == ["y"]
    assert value.values[0].names == ["x"]


def test_data_frame_columns_turn_factors_into_their_labels():
    frame = data_frame(
        {
            "text": xdr.strings(["good", "bad", "meh"]),
            "score": factor([1, 2, None], ["great", "other"]),
            "stars": xdr.doubles([5.0, 1.0, None]),
        },
        n_rows=3,
    )
    assert rdata.data_frame_columns(parse(frame)) == {
        "text": ["good", "bad", "meh"],
        "score": ["great", "other", None],
        "stars": [5.0, 1.0, None],
    }


def test_data_frame_columns_refuses_a_plain_list():
    with pytest.raises(rdata.RDataError, match="not a data frame"):
        rdata.data_frame_columns(parse(xdr.generic_list([xdr.integers([1])])))


def test_altrep_compact_integer_sequence_is_expanded():
    vector = parse(xdr.altrep("compact_intseq", xdr.doubles([4.0, 10.0, -1.0])))
    assert (vector.kind, vector.values) == ("integer", [10, 9, 8, 7])


def test_altrep_compact_real_sequence_is_expanded():
    vector = parse(xdr.altrep("compact_realseq", xdr.doubles([3.0, 1.0, 1.0])))
    assert (vector.kind, vector.values) == ("double", [1.0, 2.0, 3.0])


def test_altrep_wrapper_yields_the_wrapped_vector_with_the_wrapper_attributes():
    state = xdr.pairlist([(None, xdr.strings(["a", "b"]))], tail=xdr.integers([0, 1]))
    attrs = xdr.attributes([(xdr.symbol("names"), xdr.strings(["x", "y"]))])
    vector = parse(xdr.altrep("wrap_string", state, attrs))
    assert (vector.kind, vector.values, vector.names) == ("character", ["a", "b"], ["x", "y"])


def test_unknown_altrep_class_is_refused_by_name():
    state = xdr.pairlist([(None, xdr.integers([1]))])
    with pytest.raises(rdata.RDataError, match="deferred_string"):
        parse(xdr.altrep("deferred_string", state))


@pytest.mark.parametrize(
    ("sexp_type", "name"), [(3, "CLOSXP"), (4, "ENVSXP"), (6, "LANGSXP"), (25, "S4SXP")]
)
def test_code_and_environments_are_refused_with_the_type_name(sexp_type, name):
    with pytest.raises(rdata.RDataError, match=f"unsupported R object type {name}"):
        parse(xdr.flags(sexp_type) + b"\x00" * 16)


def test_ascii_serialization_is_refused():
    with pytest.raises(rdata.RDataError, match="ASCII"):
        rdata.parse(b"A\n3\n")


def test_truncated_stream_is_refused():
    with pytest.raises(rdata.RDataError, match="truncated"):
        parse(xdr.integers([1, 2, 3])[:-2])


def test_huge_declared_list_length_is_refused_before_reading():
    with pytest.raises(rdata.RDataError, match="longer than the data"):
        parse(xdr.flags(19) + struct.pack(">i", 2**31 - 1))


def test_reference_to_an_unread_object_is_refused():
    with pytest.raises(rdata.RDataError, match="reference 5"):
        parse(xdr.ref(5))


def test_trailing_bytes_are_refused():
    with pytest.raises(rdata.RDataError, match="unexpected bytes"):
        parse(xdr.NULL + b"\x00")


def write_lazy_load_db(directory: Path, objects: dict[str, bytes]) -> Path:
    """Writes an .rdb/.rdx pair as R does; ``objects`` maps names to compressed blobs."""
    rdb, keys, offset = b"", [], 0
    for blob in objects.values():
        keys.append(xdr.integers([offset, len(blob)]))
        rdb += blob
        offset += len(blob)
    names = xdr.attributes([(xdr.symbol("names"), xdr.strings(list(objects)))])
    variables = xdr.generic_list(keys, names)
    index_names = xdr.attributes(
        [(xdr.ref(1), xdr.strings(["variables", "references", "compressed"]))]
    )
    index = xdr.generic_list([variables, xdr.generic_list([]), xdr.integers([3])], index_names)
    (directory / "Rdata.rdb").write_bytes(rdb)
    (directory / "Rdata.rdx").write_bytes(gzip.compress(xdr.header() + index))
    return directory / "Rdata.rdb"


def zlib_blob(serialized: bytes) -> bytes:
    return struct.pack(">I", len(serialized)) + zlib.compress(serialized)


def xz_blob(serialized: bytes) -> bytes:
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
    packed = lzma.compress(serialized, format=lzma.FORMAT_RAW, filters=filters)
    return struct.pack(">I", len(serialized)) + b"Z" + packed


def test_lazy_load_database_reads_zlib_and_xz_entries_by_name(tmp_path):
    small = xdr.header() + xdr.integers([1, 2])
    words = xdr.header() + xdr.strings(["lazy", "load"])
    rdb = write_lazy_load_db(tmp_path, {"small": zlib_blob(small), "words": xz_blob(words)})
    assert rdata.lazy_load_names(rdb) == ["small", "words"]
    assert rdata.read_lazy_load_object(rdb, "small").values == [1, 2]
    assert rdata.read_lazy_load_object(rdb, "words").values == ["lazy", "load"]


def test_lazy_load_database_names_what_it_holds_when_an_object_is_missing(tmp_path):
    rdb = write_lazy_load_db(tmp_path, {"small": zlib_blob(xdr.header() + xdr.NULL)})
    with pytest.raises(KeyError, match="small"):
        rdata.read_lazy_load_object(rdb, "absent")


def test_lazy_load_entry_with_wrong_declared_length_is_refused(tmp_path):
    serialized = xdr.header() + xdr.integers([1])
    blob = struct.pack(">I", len(serialized) + 10) + zlib.compress(serialized)
    rdb = write_lazy_load_db(tmp_path, {"bad": blob})
    with pytest.raises(rdata.RDataError, match="decompressed"):
        rdata.read_lazy_load_object(rdb, "bad")


def modeldata_rdb() -> Path:
    path = default_data_dir() / MODELDATA_RDB
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run scripts/fetch_data.sh")
    return path


def test_real_modeldata_fine_foods_tibbles_read_as_data_frames():
    rdb = modeldata_rdb()
    train = rdata.read_lazy_load_object(rdb, "training_data")
    test = rdata.read_lazy_load_object(rdb, "testing_data")
    assert train.classes == ["tbl_df", "tbl", "data.frame"]
    assert train.names == ["product", "review", "score"]
    assert train.get("score").attributes["levels"].values == ["great", "other"]
    train_columns = rdata.data_frame_columns(train)
    test_columns = rdata.data_frame_columns(test)
    assert (len(train_columns["review"]), len(test_columns["review"])) == (4000, 1000)
    assert set(train_columns["score"]) == {"great", "other"}
    assert all(isinstance(review, str) and review for review in train_columns["review"])


def test_every_object_in_the_real_modeldata_database_parses():
    rdb = modeldata_rdb()
    names = rdata.lazy_load_names(rdb)
    assert {"training_data", "testing_data", "penguins"} <= set(names)
    for name in names:
        assert isinstance(rdata.read_lazy_load_object(rdb, name), rdata.RVector), name
