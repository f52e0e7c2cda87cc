"""``moerge demo --llm``: coordinator settings and how generated answers are scored."""

from __future__ import annotations

from pathlib import Path

import pytest

from moerge.coordinator.config import CoordinatorConfig
from moerge.datasets import Example, TaskData
from moerge.evaluation import MethodScore, StreamExample
from moerge.llm_demo import LORA_TARGETS, coordinator_settings, generation_score
from tests.tiny_models import make_tiny_llama


def task(name: str, options: list[str]) -> TaskData:
    return TaskData(name, "", options, train=[Example("x", options[0])], test=[])


def test_settings_make_a_valid_causal_lm_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_tiny_llama(tmp_path / "llama")
    for key, value in coordinator_settings(model).items():
        monkeypatch.setenv(key, value)
    config = CoordinatorConfig.load(data_dir=tmp_path / "coordinator")
    assert config.task_type == "causal_lm"
    assert config.target_modules == LORA_TARGETS
    assert config.base_model == str(model)


def test_generation_score_counts_exact_and_lenient_matches_per_task() -> None:
    tasks = {"pos": task("pos", ["noun", "verb"]), "topic": task("topic", ["sports", "tech"])}
    score = MethodScore("centroid", examples=4, routed_right=3)
    score.outputs = [
        (StreamExample("p1", "noun", "pos"), "Noun."),  # exact (normalised)
        (StreamExample("p2", "verb", "pos"), "The word is a verb"),  # named, not exact
        (StreamExample("p3", "tech", "topic"), "sports"),  # wrong
        (StreamExample("p4", "tech", "topic"), "tech"),  # exact
    ]
    result = generation_score(score, tasks)
    assert result.routing_accuracy == 0.75
    assert result.exact_match == 0.5
    assert result.option_named == 0.75
    assert result.exact_by_task == {"pos": 0.5, "topic": 0.5}


def test_generation_score_keeps_a_method_error() -> None:
    score = MethodScore("arrow", error="FAILED_PRECONDITION: no router")
    result = generation_score(score, {"pos": task("pos", ["noun", "verb"])})
    assert result.error.startswith("FAILED_PRECONDITION") and result.exact_match == 0.0
