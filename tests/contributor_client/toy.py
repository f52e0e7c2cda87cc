"""Toy data and settings shared by the contributor client tests."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moerge.contributor_client.recipe import TrainConfig

SPORT = ["sport", "match", "team", "goal", "player", "win", "lose", "score", "league", "cup"]
MONEY = ["money", "bank", "market", "stock", "price", "trade", "growth", "profit", "economy"]
FILLER = ["the", "a", "and", "of", "to", "in", "on", "for", "with", "is"]


def toy_examples(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """An easy, separable task: sport words vs money words, with some filler."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(count):
        label = "sport" if i % 2 else "finance"
        topic = SPORT if label == "sport" else MONEY
        words = [
            rng.choice(topic) if rng.random() < 0.7 else rng.choice(FILLER)
            for _ in range(rng.randint(3, 10))
        ]
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def write_jsonl(path: Path, texts: Sequence[str], labels: Sequence[str] | None) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            record = {"text": text} if labels is None else {"text": text, "label": labels[i]}
            handle.write(json.dumps(record) + "\n")
    return path


def toy_config(base_model: Path, **overrides: Any) -> TrainConfig:
    """Settings under which the tiny BERT learns the toy task in about a second."""
    config = TrainConfig(
        base_model=str(base_model),
        epochs=6,
        learning_rate=2e-2,
        lora_dropout=0.0,
        validation_fraction=0.2,
        base_model_id="tiny-bert",
    )
    return dataclasses.replace(config, **overrides)
