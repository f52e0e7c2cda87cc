"""Instruction tasks for causal-LM experts: prompts that name the options, fixed splits, metric."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from moerge.answers import answers_match, first_option_named, normalise_answer
from moerge.datasets.instruction_tasks import (
    INSTRUCTION_TASKS,
    SYSTEM_PROMPT,
    as_chat,
    load_word_class,
)
from tests.tiny_models import make_tiny_llama

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_index(root: Path, suffix: str, lines: list[str]) -> None:
    folder = root / "debian" / "wordnet-base" / "usr" / "share" / "wordnet"
    folder.mkdir(parents=True, exist_ok=True)
    header = "  1 This software and database is being provided to you, the LICENSEE  \n"
    (folder / f"index.{suffix}").write_text(header + "".join(f"{x}  \n" for x in lines))


def index_line(lemma: str, pos: str, tagged: int) -> str:
    # lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset
    return f"{lemma} {pos} 1 2 @ ~ 1 {tagged} 00001740"


@pytest.fixture
def wordnet_dir(tmp_path: Path) -> Path:
    nouns = [f"noun{c}" for c in "abcdefghij"]  # letters only: "nouna", ...
    write_index(
        tmp_path,
        "noun",
        [index_line(w, "n", 1) for w in ["table", "chair", "lamp", "house", "river", "stone"]]
        + [index_line("run", "n", 3), index_line("obscurity", "n", 0)]
        + [index_line("ice_cream", "n", 2), index_line("b52", "n", 2)]
        + [index_line(w, "n", 1) for w in nouns[:0]],
    )
    write_index(tmp_path, "verb", [index_line(w, "v", 1) for w in ["run", "eat", "sing", "walk"]])
    write_index(tmp_path, "adj", [index_line(w, "a", 2) for w in ["red", "tall", "blue", "big"]])
    write_index(tmp_path, "adv", [index_line(w, "r", 1) for w in ["fast", "slowly", "soon", "oft"]])
    return tmp_path


def test_word_class_keeps_tagged_single_word_lemmas_with_one_part_of_speech(
    wordnet_dir: Path,
) -> None:
    data = load_word_class(data_dir=wordnet_dir)
    words = {e.text.split('"')[1]: e.label for e in data.train + data.test}
    assert "run" not in words  # a noun and a verb: ambiguous
    assert "obscurity" not in words  # never sense-tagged
    assert "ice_cream" not in words and "b52" not in words and "oft" not in words
    assert words["eat"] == "verb" and words["slowly"] == "adverb" and words["red"] == "adjective"


def test_word_class_balances_classes_so_one_answer_scores_a_quarter(wordnet_dir: Path) -> None:
    data = load_word_class(data_dir=wordnet_dir)
    counts = Counter(e.label for e in data.train + data.test)
    # 6 tagged one-class nouns, 3 verbs (run is ambiguous), 4 adjectives, 3 adverbs (oft is short)
    assert counts == {"noun": 3, "verb": 3, "adjective": 3, "adverb": 3}
    assert data.label_names == ["adjective", "adverb", "noun", "verb"]


@pytest.mark.parametrize("name", sorted(INSTRUCTION_TASKS))
def test_every_answer_is_an_option_and_listed_options_are_named_in_the_prompt(name: str) -> None:
    data = INSTRUCTION_TASKS[name](max_train=60, max_test=30)
    for example in data.train + data.test:
        assert example.label in data.label_names
    if name != "noun_category":  # 26 categories are learned, not listed
        for example in data.test:
            assert all(option in example.text for option in data.label_names)


@pytest.mark.parametrize("name", ["word_class", "news_topic", "review_verdict"])
def test_test_set_is_fixed_and_disjoint_from_training(name: str) -> None:
    first = INSTRUCTION_TASKS[name](max_train=40, max_test=20, seed=0)
    second = INSTRUCTION_TASKS[name](max_train=40, max_test=20, seed=0)
    assert first.test == second.test
    full = INSTRUCTION_TASKS[name]()
    assert not {e.text for e in full.train} & {e.text for e in full.test}


def test_long_texts_are_cut_to_keep_prompts_short() -> None:
    data = INSTRUCTION_TASKS["news_topic"](max_train=20, max_test=5)
    for example in data.train:
        story = example.text.split("\n\n", 1)[1]
        assert len(story.split()) <= 25  # 24 words and " ..."


@pytest.mark.parametrize(
    ("output", "answer", "matches"),
    [("noun", "noun", True), (" Sports.", "sports", True), ('"fresh"', "fresh", True),
     ("The word is a noun.", "noun", False), ("nouns", "noun", False), ("", "noun", False)],
)  # fmt: skip
def test_exact_match_ignores_case_quotes_and_final_punctuation_only(
    output: str, answer: str, matches: bool
) -> None:
    assert answers_match(output, answer) is matches
    assert normalise_answer(output) == normalise_answer(output.upper())


def test_first_option_named_is_the_earliest_whole_word() -> None:
    options = ["business", "sports", "tech"]
    assert first_option_named("This story is about sports, not tech.", options) == "sports"
    assert first_option_named("Technology", options) is None  # whole words only
    assert first_option_named("I cannot tell.", options) is None


def test_as_chat_renders_system_and_user_turns_ready_for_the_answer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model = make_tiny_llama(tmp_path / "llama")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = CHAT_TEMPLATE
    data = load_word_class(max_train=8, max_test=4)
    chat = as_chat(data, tokenizer)
    for plain, rendered in zip(data.train + data.test, chat.train + chat.test, strict=True):
        assert rendered.text == (f"<|system|>{SYSTEM_PROMPT}\n<|user|>{plain.text}\n<|assistant|>")
        assert rendered.label == plain.label
