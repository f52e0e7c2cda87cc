"""Labelled examples, a task's fixed train/test split and seeded caps: what every task shares.

Texts are kept as they are apart from whitespace normalisation (runs of whitespace become single
spaces). Empty texts are dropped, repeated texts are kept once and texts that occur with two
different labels are dropped, so train and test never share a text. The split is stratified and
seeded with a constant (:data:`SPLIT_SEED`), so every contributor and every benchmark sees the
same test set; ``seed`` only chooses which examples the optional ``max_train``/``max_test`` caps
keep (a stratified subsample that keeps every class).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: Seed of the train/test split; constant so that test sets never change between runs.
#: Seed of the train/test split; constant so that test sets never change between runs.
SPLIT_SEED = 20240611
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Example:
    """One labelled text."""

    text: str
    label: str


@dataclass
class TaskData:
    """A classification task: its classes and a train/test split of labelled texts."""

    name: str
    description: str
    label_names: list[str]
    train: list[Example]
    test: list[Example]

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Examples per class, for ``"train"`` and ``"test"``, in ``label_names`` order."""
        counts = {}
        for split, examples in (("train", self.train), ("test", self.test)):
            counter = Counter(example.label for example in examples)
            counts[split] = {label: counter[label] for label in self.label_names}
        return counts

    def summary(self) -> str:
        """A short report: the task, its split sizes and the examples per class."""
        counts = self.class_counts()
        width = max(len(label) for label in self.label_names)
        lines = [
            f"{self.name}: {self.description}",
            f"{len(self.label_names)} classes, {len(self.train)} train, {len(self.test)} test",
        ]
        for label in self.label_names:
            train, test = counts["train"][label], counts["test"][label]
            lines.append(f"  {label:<{width}}  train {train:>6}  test {test:>6}")
        return "\n".join(lines)


# -- cleaning, splitting, capping ---------------------------------------------------------------


def _normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def clean_examples(pairs: Iterable[tuple[str, str]]) -> list[Example]:
    """Normalises whitespace, drops empty texts, keeps repeats once, drops ambiguous texts."""
    labels_by_text: dict[str, set[str]] = defaultdict(set)
    order: list[str] = []
    for text, label in pairs:
        text = _normalise_whitespace(text)
        if not text:
            continue
        if text not in labels_by_text:
            order.append(text)
        labels_by_text[text].add(label)
    return [
        Example(text, next(iter(labels_by_text[text])))
        for text in order
        if len(labels_by_text[text]) == 1
    ]


def _by_label(examples: Iterable[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        groups[example.label].append(example)
    return dict(sorted(groups.items()))


def _stratified_split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """Puts ``TEST_FRACTION`` of each class (at least one example) in test, with a fixed seed."""
    rng = random.Random(SPLIT_SEED)
    train: list[Example] = []
    test: list[Example] = []
    for label, group in _by_label(examples).items():
        if len(group) < 2:
            raise ValueError(f"class {label!r} has {len(group)} example; a split needs 2")
        group = group.copy()
        rng.shuffle(group)
        n_test = min(len(group) - 1, max(1, round(len(group) * TEST_FRACTION)))
        test.extend(group[:n_test])
        train.extend(group[n_test:])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _allocate(counts: dict[str, int], cap: int) -> dict[str, int]:
    """Splits ``cap`` over classes in proportion to ``counts``, giving every class at least one."""
    total = sum(counts.values())
    if cap >= total:
        return dict(counts)
    if cap < len(counts):
        raise ValueError(f"a cap of {cap} cannot keep all {len(counts)} classes")
    exact = {label: cap * n / total for label, n in counts.items()}
    quota = {label: max(1, math.floor(share)) for label, share in exact.items()}
    while sum(quota.values()) > cap:  # the minimum of one per class overshot: trim the largest
        largest = max(sorted(quota), key=lambda label: quota[label])
        quota[largest] -= 1
    while sum(quota.values()) < cap:  # hand out what rounding down left, largest remainder first
        open_labels = [label for label in sorted(quota) if quota[label] < counts[label]]
        neediest = max(open_labels, key=lambda label: exact[label] - quota[label])
        quota[neediest] += 1
    return quota


def _stratified_cap(examples: list[Example], cap: int | None, seed: int) -> list[Example]:
    """A seeded subsample of at most ``cap`` examples, stratified by label, in original order."""
    if cap is None or cap >= len(examples):
        return examples
    groups = _by_label(examples)
    quota = _allocate({label: len(group) for label, group in groups.items()}, cap)
    rng = random.Random(seed)
    kept: set[Example] = set()
    for label, group in groups.items():
        kept.update(rng.sample(group, quota[label]))
    return [example for example in examples if example in kept]


def make_task(
    name: str,
    description: str,
    train: list[Example],
    test: list[Example],
    max_train: int | None,
    max_test: int | None,
    seed: int,
) -> TaskData:
    """A task of already split examples, each split capped to a seeded, label-stratified
    subsample."""
    label_names = sorted({example.label for example in train} | {example.label for example in test})
    return TaskData(
        name=name,
        description=description,
        label_names=label_names,
        train=_stratified_cap(train, max_train, seed),
        test=_stratified_cap(test, max_test, seed),
    )


def split_task(
    name: str,
    description: str,
    pairs: list[tuple[str, str]],
    max_train: int | None,
    max_test: int | None,
    seed: int,
) -> TaskData:
    """A task from raw (text, label) pairs: cleaned, split stratified by label with the fixed split
    seed, then capped as :func:`make_task` does."""
    train, test = _stratified_split(clean_examples(pairs))
    return make_task(name, description, train, test, max_train, max_test, seed)


def write_jsonl(examples: Iterable[Example], path: str | Path) -> Path:
    """Writes examples as UTF-8 JSON lines with fields ``text`` and ``label``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            record = {"text": example.text, "label": example.label}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
