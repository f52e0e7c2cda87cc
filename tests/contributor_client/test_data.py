"""Reading local data files and splitting them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moerge.contributor_client.data import label_order, load_examples, train_validation_split


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_gives_texts_and_string_labels(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"text": "good film", "label": "pos"}),
            "",
            json.dumps({"text": "bad film", "label": 0, "extra": 1}),
        ],
    )
    examples = load_examples(path)
    assert examples.texts == ["good film", "bad film"]
    assert examples.labels == ["pos", "0"]
    assert len(examples) == 2


def test_csv_gives_texts_and_labels_with_custom_fields(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.csv", ["body,topic", '"a, quoted text",x', "plain,y"])
    examples = load_examples(path, text_field="body", label_field="topic")
    assert examples.texts == ["a, quoted text", "plain"]
    assert examples.labels == ["x", "y"]


def test_parquet_gives_texts_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", "two"], "label": [3, 4]}), path)
    examples = load_examples(path)
    assert examples.texts == ["one", "two"]
    assert examples.labels == ["3", "4"]


def test_label_free_file_has_no_labels(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "just text"})])
    assert load_examples(path).labels is None


def test_label_field_none_ignores_labels(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "t", "label": "x"})])
    assert load_examples(path, label_field=None).labels is None


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps({"text": "a"}), json.dumps({"body": "b"})], r"line 2: missing field 'text'"),
        ([json.dumps({"text": 7})], r"line 1: field 'text' must be a string, got int"),
        ([json.dumps({"text": "  "})], r"line 1: field 'text' is empty"),
        (["{not json"], r"line 1: invalid JSON"),
        (["[1, 2]"], r"line 1: expected a JSON object"),
        (
            [json.dumps({"text": "a", "label": "x"}), json.dumps({"text": "b"})],
            r"line 2: missing field 'label' \(other records have it\)",
        ),
        ([json.dumps({"text": "a", "label": 1.5})], r"line 1: field 'label' must be a string or"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message) as info:
        load_examples(path)
    assert "bad.jsonl" in str(info.value)


def test_csv_error_names_line_and_field(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.csv", ["text,label", "fine,a", ",b"])
    with pytest.raises(ValueError, match=r"bad.csv line 3: field 'text' is empty"):
        load_examples(path)


def test_csv_without_text_column_is_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.csv", ["body,label", "fine,a"])
    with pytest.raises(ValueError, match=r"bad.csv line 2: missing field 'text'"):
        load_examples(path)


def test_parquet_error_names_row_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["ok", None], "label": ["a", "b"]}), path)
    with pytest.raises(ValueError, match=r"bad.parquet row 2: missing field 'text'"):
        load_examples(path)


def test_parquet_non_string_text_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(ValueError, match=r"row 1: field 'text' must be a string, got int"):
        load_examples(path)


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv"])
def test_empty_file_is_rejected(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{name}: no examples \(empty file\)"):
        load_examples(path)


def test_unknown_extension_is_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "data.txt", ["hello"])
    with pytest.raises(ValueError, match=r"data.txt: unknown file type '.txt'"):
        load_examples(path)


def test_non_utf8_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl: not UTF-8"):
        load_examples(path)


def test_label_order_is_numeric_for_integers_else_lexicographic() -> None:
    assert label_order(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_order(["sport", "finance", "tech"]) == ["finance", "sport", "tech"]


def test_split_is_stratified_seeded_and_disjoint() -> None:
    labels = ["a"] * 50 + ["b"] * 10
    train, validation = train_validation_split(labels, len(labels), 0.2, seed=3)
    assert sorted(train + validation) == list(range(60))
    assert [labels[i] for i in validation].count("a") == 10
    assert [labels[i] for i in validation].count("b") == 2
    assert train_validation_split(labels, len(labels), 0.2, seed=3) == (train, validation)
    assert train_validation_split(labels, len(labels), 0.2, seed=4) != (train, validation)


def test_split_keeps_every_label_in_training() -> None:
    train, validation = train_validation_split(["a", "b", "b"], 3, 0.5, seed=0)
    assert 0 in train  # a single "a" is never held out
    assert len(validation) == 1 and validation[0] in (1, 2)
