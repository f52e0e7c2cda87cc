"""Whether a generated answer is the expected one: the metric of one-word-answer tasks.

Why on the ground floor: the same comparison scores the demo's causal-LM experts
(:mod:`moerge.llm_demo`), a user's labelled file (:mod:`moerge.evaluation`) and the
generalization benchmarks, so that all of them count the same answers right. (The few-shot
composition search scores the answers' likelihood instead: :mod:`moerge.coordinator.inference.
answer_scoring`.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def normalise_answer(text: str) -> str:
    """Lower case, surrounding whitespace, quotes and final punctuation removed.

    Exact match compares these forms, so ``"Sports."`` matches ``sports``; a sentence such
    as ``The word is a noun.`` does not match ``noun``.
    """
    return text.strip().strip("\"'`").strip().rstrip(".!").strip().lower()


def answers_match(output: str, answer: str) -> bool:
    """The task metric: exact match of the normalised generated text and answer."""
    return normalise_answer(output) == normalise_answer(answer)


def first_option_named(output: str, options: Sequence[str]) -> str | None:
    """The option named first in ``output`` as a whole word (case-insensitive), else None.

    A lenient second metric: ``This news story is about sports.`` names ``sports``, which
    exact match would count wrong; it shows what the base model knows apart from the form.
    """
    found = []
    for option in options:
        hit = re.search(rf"\b{re.escape(option.lower())}\b", output.lower())
        if hit:
            found.append((hit.start(), option))
    return min(found)[1] if found else None
