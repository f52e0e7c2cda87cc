"""Reads a contributor's local examples (JSONL, CSV or Parquet) and splits them for training.

The data never leaves the contributor's machine; this module only turns a file into texts and
string labels, with errors that name the file, the line (or row) and the field at fault.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: File name endings read by :func:`load_examples`, and the reader of each.
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class Examples:
    """Texts and (optionally) their labels, in file order."""

    texts: list[str]  # one input text per example
    labels: list[str] | None  # one label per example; None when the file has no label field
    source: str = ""  # the file they came from, for messages

    def __len__(self) -> int:
        return len(self.texts)


def load_examples(
    path: str | Path, text_field: str = "text", label_field: str | None = "label"
) -> Examples:
    """Read examples from a ``.jsonl``/``.ndjson``, ``.csv`` or ``.parquet`` file.

    Texts must be non-empty strings. Labels may be strings or integers (read as their decimal
    string). A file whose records have no ``label_field`` at all is label-free (``labels`` is
    None, fine for causal LM experts); if some records have it, every record must.
    Raises ``ValueError`` naming the file, the line (JSONL, CSV) or row (Parquet, 1-based) and
    the field.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = _jsonl_records(path)
    elif suffix in CSV_SUFFIXES:
        records = _csv_records(path)
    elif suffix in PARQUET_SUFFIXES:
        records = _parquet_records(path)
    else:
        known = ", ".join(JSONL_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES)
        raise ValueError(f"{path}: unknown file type '{suffix}' (expected one of {known})")

    texts: list[str] = []
    raw_labels: list[tuple[str, Any]] = []  # (where, value or None) per record
    try:
        for where, record in records:
            texts.append(_text(path, where, record, text_field))
            if label_field is not None:
                raw_labels.append((where, record.get(label_field)))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not texts:
        raise ValueError(f"{path}: no examples (empty file)")
    return Examples(texts=texts, labels=_labels(path, raw_labels, label_field), source=str(path))


def label_order(labels: Iterable[str]) -> list[str]:
    """The distinct labels in the order of the classification head's outputs.

    Labels that are all decimal integers are ordered numerically (so label "2" is output 2),
    any other set lexicographically: the order depends only on the set, never on file order.
    """
    distinct = set(labels)
    if distinct and all(_is_int(x) for x in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def train_validation_split(
    labels: Sequence[str] | None, count: int, fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded, stratified split of ``range(count)`` into (train, validation) indices.

    Each label keeps its share: ``round(fraction * n_label)`` of its examples go to validation,
    but at least one stays in training. Without labels the whole set is one stratum.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    strata: dict[str, list[int]] = {}
    for index in range(count):
        strata.setdefault(labels[index] if labels is not None else "", []).append(index)
    rng = random.Random(seed)
    train: list[int] = []
    validation: list[int] = []
    for key in sorted(strata):
        members = strata[key]
        rng.shuffle(members)
        n_val = min(round(fraction * len(members)), len(members) - 1)
        validation.extend(members[:n_val])
        train.extend(members[n_val:])
    return sorted(train), sorted(validation)


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object")
            yield f"line {number}", record


def _csv_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        for record in reader:
            yield f"line {reader.line_num}", record


def _parquet_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
    for number, record in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", record


def _text(path: Path, where: str, record: dict[str, Any], field: str) -> str:
    value = record.get(field)
    if value is None:
        raise ValueError(f"{path} {where}: missing field '{field}'")
    if not isinstance(value, str):
        raise ValueError(
            f"{path} {where}: field '{field}' must be a string, got {type(value).__name__}"
        )
    if not value.strip():
        raise ValueError(f"{path} {where}: field '{field}' is empty")
    return value


def _labels(path: Path, raw: list[tuple[str, Any]], field: str | None) -> list[str] | None:
    if field is None or all(value is None for _, value in raw):
        return None
    labels: list[str] = []
    for where, value in raw:
        if value is None:
            raise ValueError(f"{path} {where}: missing field '{field}' (other records have it)")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(
                f"{path} {where}: field '{field}' must be a string or integer, "
                f"got {type(value).__name__}"
            )
        label = str(value)
        if not label.strip():
            raise ValueError(f"{path} {where}: field '{field}' is empty")
        labels.append(label)
    return labels


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()
