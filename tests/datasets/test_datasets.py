"""The task loaders: documented classes, fixed stratified splits, seeded caps, clear errors."""

from __future__ import annotations

import gzip
import json
import re
from functools import cache

import pytest

from moerge.datasets import Example, TaskData, splits, tasks

EXPECTED_LABELS = {
    "bbc_news": ["business", "entertainment", "politics", "sports", "tech"],
    "rotten_tomatoes": ["fresh", "rotten"],
    "amazon_food": ["great", "other"],
    "wordnet_supersense": sorted(tasks.NOUN_LEXNAMES.values()),
    "fortunes": [
        "art", "computers", "cookie", "definitions", "knghtbrd", "men-women", "miscellaneous",
        "people", "platitudes", "politics", "science", "songs-poems", "wisdom", "work", "zippy",
    ],
}  # fmt: skip
DEBIAN_TASKS = ["amazon_food", "wordnet_supersense", "fortunes"]


@cache
def full_task(name: str) -> TaskData:
    return tasks.load_task(name)


def texts(examples: list[Example]) -> set[str]:
    return {example.text for example in examples}


def test_registry_lists_exactly_the_documented_tasks():
    assert sorted(tasks.TASKS) == sorted(EXPECTED_LABELS)


@pytest.mark.parametrize("name", sorted(EXPECTED_LABELS))
def test_task_has_its_documented_classes_in_both_splits(name):
    task = full_task(name)
    assert task.name == name
    assert task.label_names == EXPECTED_LABELS[name]
    counts = task.class_counts()
    assert all(counts["train"][label] > 0 for label in task.label_names)
    assert all(counts["test"][label] > 0 for label in task.label_names)


@pytest.mark.parametrize("name", sorted(EXPECTED_LABELS))
def test_train_and_test_share_no_text(name):
    task = full_task(name)
    assert task.train and task.test
    assert not texts(task.train) & texts(task.test)
    assert len(texts(task.train)) == len(task.train)


@pytest.mark.parametrize("name", sorted(EXPECTED_LABELS))
def test_texts_are_non_empty_and_whitespace_normalised(name):
    task = full_task(name)
    for example in task.train + task.test:
        assert example.text
        assert example.text == " ".join(example.text.split())


@pytest.mark.parametrize("name", sorted(EXPECTED_LABELS))
def test_split_is_the_same_whatever_the_seed(name):
    again = tasks.load_task(name, seed=123)
    assert again.train == full_task(name).train
    assert again.test == full_task(name).test


@pytest.mark.parametrize("name", ["bbc_news", "rotten_tomatoes", "fortunes"])
def test_split_puts_a_fifth_of_every_class_in_test(name):
    counts = full_task(name).class_counts()
    for label, n_test in counts["test"].items():
        assert n_test == round((n_test + counts["train"][label]) * splits.TEST_FRACTION)


@pytest.mark.parametrize("name", sorted(EXPECTED_LABELS))
def test_caps_keep_every_class_and_are_deterministic_for_a_seed(name):
    n_classes = len(EXPECTED_LABELS[name])
    cap = max(2 * n_classes, 60)
    task = tasks.load_task(name, max_train=cap, max_test=n_classes, seed=7)
    assert len(task.train) == cap
    assert len(task.test) == n_classes
    assert {e.label for e in task.train} == {e.label for e in task.test} == set(task.label_names)
    assert texts(task.train) <= texts(full_task(name).train)
    assert texts(task.test) <= texts(full_task(name).test)
    again = tasks.load_task(name, max_train=cap, max_test=n_classes, seed=7)
    assert (again.train, again.test) == (task.train, task.test)


def test_capped_train_keeps_the_class_proportions():
    capped = tasks.load_task("amazon_food", max_train=1000)
    full, small = full_task("amazon_food").class_counts(), capped.class_counts()
    great_share = full["train"]["great"] / len(full_task("amazon_food").train)
    assert abs(small["train"]["great"] - 1000 * great_share) <= 1


def test_different_seeds_pick_different_capped_examples():
    first = tasks.load_task("rotten_tomatoes", max_train=100, seed=0)
    second = tasks.load_task("rotten_tomatoes", max_train=100, seed=1)
    assert texts(first.train) != texts(second.train)


def test_cap_below_the_number_of_classes_is_refused():
    with pytest.raises(ValueError, match="cannot keep all 5 classes"):
        tasks.load_task("bbc_news", max_train=3)


def test_unknown_task_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="bbc_news"):
        tasks.load_task("imdb")


@pytest.mark.parametrize("name", DEBIAN_TASKS)
def test_missing_debian_data_asks_to_run_the_fetch_script(name, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape("scripts/fetch_data.sh")):
        tasks.load_task(name, data_dir=tmp_path)


def test_data_dir_defaults_to_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MOERGE_DATASETS_DIR", str(tmp_path))
    assert tasks.default_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        tasks.load_task("fortunes")


def test_available_tasks_lists_only_tasks_whose_data_is_present(tmp_path):
    assert tasks.available_tasks() == list(tasks.TASKS)
    assert tasks.available_tasks(data_dir=tmp_path) == ["bbc_news", "rotten_tomatoes"]


def test_summary_reports_class_counts_per_split():
    task = full_task("amazon_food")
    counts = task.class_counts()
    summary = task.summary()
    assert f"{len(task.train)} train, {len(task.test)} test" in summary
    great = re.search(r"great\s+train\s+(\d+)\s+test\s+(\d+)", summary)
    assert great is not None
    assert (int(great[1]), int(great[2])) == (counts["train"]["great"], counts["test"]["great"])


def test_write_jsonl_writes_one_text_label_record_per_line(tmp_path):
    examples = [Example("Très bon\tfilm", "fresh"), Example('say "no"', "rotten")]
    path = splits.write_jsonl(examples, tmp_path / "out" / "train.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"text": "Très bon\tfilm", "label": "fresh"},
        {"text": 'say "no"', "label": "rotten"},
    ]


def test_amazon_reviews_have_no_html_line_breaks():
    task = full_task("amazon_food")
    assert not any("<br" in example.text.lower() for example in task.train + task.test)


def test_wordnet_texts_are_glosses_labelled_with_their_supersense():
    task = full_task("wordnet_supersense")
    labels = {example.text: example.label for example in task.train + task.test}
    dog = (
        "a member of the genus Canis (probably descended from the common wolf) that has been "
        'domesticated by man since prehistoric times; occurs in many breeds; "the dog barked all '
        'night"'
    )
    assert labels[dog] == "noun.animal"
    assert labels['informal term for a man; "you lucky dog"'] == "noun.person"


def test_noun_lexnames_match_the_table_shipped_with_wordnet():
    manual = tasks.default_data_dir() / "debian/wordnet-base/usr/share/man/man5/lexnames.5WN.gz"
    table = gzip.decompress(manual.read_bytes()).decode()
    rows = re.findall(r"^(\d\d)\t(noun\.\w+)", table, flags=re.MULTILINE)
    shipped = {int(number): name for number, name in rows}
    assert shipped == tasks.NOUN_LEXNAMES


def make_fortunes_tree(root, files: dict[str, str]) -> None:
    directory = root / "debian/fortunes/usr/share/games/fortunes"
    directory.mkdir(parents=True)
    for name, content in files.items():
        (directory / name).write_text(content, encoding="utf-8")


def test_fortunes_keep_only_categories_with_enough_entries(tmp_path):
    many = "\n%\n".join(f"Saying number {i}\n\t-- someone" for i in range(400)) + "\n%\n"
    make_fortunes_tree(
        tmp_path,
        {"big": many, "other": many.replace("Saying", "Quip"), "small": "Only one\n%\n"},
    )
    task = tasks.load_fortunes(data_dir=tmp_path)
    assert task.label_names == ["big", "other"]
    assert sum(task.class_counts()["train"].values()) + len(task.test) == 800
    assert "Saying number 7 -- someone" in texts(task.train) | texts(task.test)


def test_fortunes_lose_overstrike_formatting_and_strfile_indexes(tmp_path):
    underlined = "It is *____\b\b\b\bonly* ones and zeroes."
    entries = [underlined] + [f"Entry {i}" for i in range(399)]
    make_fortunes_tree(tmp_path, {"computers": "\n%\n".join(entries), "computers.dat": "\x00\x01"})
    task = tasks.load_fortunes(data_dir=tmp_path)
    assert task.label_names == ["computers"]
    assert "It is *only* ones and zeroes." in texts(task.train) | texts(task.test)
