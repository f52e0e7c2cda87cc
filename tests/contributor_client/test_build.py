"""One-call expert folders: train from a data file, or complete a brought adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModel

from moerge.contributor_client.build import build_expert, write_expert_statistics
from moerge.contributor_client.gates import GateConfig
from moerge.contributor_client.privacy import (
    DEFAULT_DELTA,
    DEFAULT_EPSILON,
    MIN_EXAMPLES_WITHOUT_DP,
)
from moerge.contributor_client.recipe import TrainConfig
from moerge.contributor_client.statistics import TooFewExamples, load_statistics
from moerge.contributor_client.training import TrainResult
from moerge.expert_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_FILES, gate_key

from .toy import toy_config, toy_examples, write_jsonl

QUICK_GATES = GateConfig(steps=3)


def assert_complete_expert(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(EXPERT_FILES)
    tensors, meta = load_statistics(folder)
    assert sorted(k for k in tensors if k.startswith("gates.")) == sorted(
        gate_key(m) for m in meta.gate_modules
    )


def test_build_expert_writes_a_complete_classification_expert(
    tiny_bert: Path, tmp_path: Path
) -> None:
    texts, labels = toy_examples(60)
    data = write_jsonl(tmp_path / "data.jsonl", texts, labels)
    report = build_expert(
        data,
        tmp_path / "expert",
        "toy",
        toy_config(tiny_bert, epochs=1),
        task_description="sport or money",
        gate_config=QUICK_GATES,
        base_model_revision="rev-1",
        progress=False,
    )
    assert_complete_expert(tmp_path / "expert")
    assert report.train is not None and report.gates_skipped == ""
    assert report.meta.label_names == report.train.label_names == ["finance", "sport"]
    # DP is on by default: the counts are released with Gaussian noise whose std the expert
    # records (epsilon 8: ~6.3 for the label counts, ~1.6 for the count); within 5 std
    # (a failure once in millions of runs; 12 alone failed about one run in ten)
    assert report.meta.dp is not None and report.meta.dp.epsilon == DEFAULT_EPSILON
    stds = report.meta.dp.noise_std
    assert all(abs(c - 30) <= 5 * stds["label_counts"] for c in report.meta.label_counts)
    assert abs(report.meta.example_count - 60) <= 5 * stds["count"]
    privacy = report.meta.privacy
    assert privacy is not None and not privacy.statistics_opt_out and not privacy.all_dp
    assert [(r.what, r.mechanism) for r in privacy.releases] == [
        ("statistics", "gaussian_pld"),
        ("adapter", "none"),
        ("gates", "none"),
    ]
    assert (privacy.epsilon, privacy.delta) == (DEFAULT_EPSILON, DEFAULT_DELTA)
    assert report.meta.task_type == "classification"
    assert (report.meta.base_model_id, report.meta.base_model_revision) == ("tiny-bert", "rev-1")
    assert len(report.meta.gate_modules) == 4
    assert set(report.seconds) == {"train", "gates", "statistics", "total"}


def test_build_expert_without_dp_is_an_explicit_recorded_choice(
    tiny_bert: Path, tmp_path: Path
) -> None:
    texts, labels = toy_examples(60)
    data = write_jsonl(tmp_path / "data.jsonl", texts, labels)
    report = build_expert(
        data,
        tmp_path / "expert",
        "toy",
        toy_config(tiny_bert, epochs=1),
        with_gates=False,
        no_dp=True,
        progress=False,
    )
    assert report.meta.dp is None
    assert report.meta.label_counts == [30, 30] and report.meta.example_count == 60
    assert report.meta.privacy.statistics_opt_out and report.meta.privacy.epsilon is None
    assert load_statistics(tmp_path / "expert")[1].privacy.statistics_opt_out
    small = write_jsonl(tmp_path / "small.jsonl", *toy_examples(MIN_EXAMPLES_WITHOUT_DP - 1))
    with pytest.raises(TooFewExamples):  # refused before any training
        build_expert(
            small,
            tmp_path / "no",
            "toy",
            toy_config(tiny_bert, epochs=1),
            no_dp=True,
            progress=False,
        )
    assert not (tmp_path / "no").exists()


def test_build_expert_for_a_causal_lm_from_label_free_data(
    tiny_llama: Path, tmp_path: Path
) -> None:
    texts, _ = toy_examples(30)
    data = write_jsonl(tmp_path / "data.jsonl", texts, None)
    config = TrainConfig(base_model=str(tiny_llama), task_type="causal_lm", epochs=1)
    report = build_expert(
        data, tmp_path / "expert", "lm", config, gate_config=QUICK_GATES, progress=False
    )
    assert_complete_expert(tmp_path / "expert")
    assert report.meta.task_type == "causal_lm"
    assert report.meta.label_names == [] and report.meta.label_counts == []
    assert report.meta.gate_modules[0] == "layers.0.self_attn.q_proj"


def test_build_expert_without_gates(tiny_bert: Path, tmp_path: Path) -> None:
    texts, labels = toy_examples(20)
    data = write_jsonl(tmp_path / "data.jsonl", texts, labels)
    report = build_expert(
        data,
        tmp_path / "expert",
        "toy",
        toy_config(tiny_bert, epochs=1),
        with_gates=False,
        progress=False,
    )
    assert_complete_expert(tmp_path / "expert")
    assert report.meta.gate_modules == [] and report.gates_skipped == "gates disabled"


def test_brought_classification_adapter_gets_gates_and_a_copy(
    tiny_bert: Path, toy_expert: tuple[Path, TrainResult], tmp_path: Path
) -> None:
    adapter_dir, trained = toy_expert
    texts, labels = toy_examples(40, seed=5)
    data = write_jsonl(tmp_path / "data.jsonl", texts, labels)
    report = write_expert_statistics(
        adapter_dir,
        data,
        "toy",
        base_model_path=tiny_bert,
        out_dir=tmp_path / "expert",
        gate_config=QUICK_GATES,
        base_model_revision="rev-2",
        progress=False,
    )
    assert_complete_expert(tmp_path / "expert")
    assert report.train is None and report.gates_skipped == ""
    assert report.meta.label_names == trained.label_names
    assert (report.meta.base_model_id, report.meta.base_model_revision) == ("tiny-bert", "rev-2")
    assert len(report.meta.gate_modules) == 4
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert (tmp_path / "expert" / name).read_bytes() == (adapter_dir / name).read_bytes()
    assert sorted(p.name for p in adapter_dir.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def test_brought_adapter_without_a_task_head_skips_gates(tiny_bert: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = get_peft_model(AutoModel.from_pretrained(tiny_bert), LoraConfig(r=2))
    model.save_pretrained(tmp_path / "adapter")
    texts, labels = toy_examples(20)
    data = write_jsonl(tmp_path / "data.jsonl", texts, labels)
    report = write_expert_statistics(tmp_path / "adapter", data, "plain", progress=False)
    assert report.meta.gate_modules == []
    assert "no task loss" in report.gates_skipped
    tensors, meta = load_statistics(tmp_path / "adapter")
    assert not any(k.startswith("gates.") for k in tensors)
    assert meta.label_names == ["finance", "sport"]
    assert load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))  # untouched, still readable


def test_brought_adapter_with_unlabelled_data_skips_gates(
    tiny_bert: Path, toy_expert: tuple[Path, TrainResult], tmp_path: Path
) -> None:
    texts, _ = toy_examples(20)
    data = write_jsonl(tmp_path / "data.jsonl", texts, None)
    report = write_expert_statistics(
        toy_expert[0],
        data,
        "toy",
        base_model_path=tiny_bert,
        out_dir=tmp_path / "expert",
        progress=False,
    )
    assert report.gates_skipped == "the data has no labels for the classification loss"
    assert report.meta.label_names == [] and report.meta.gate_modules == []


def test_brought_adapter_whose_head_disagrees_with_the_labels_is_rejected(
    tiny_bert: Path, toy_expert: tuple[Path, TrainResult], tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", ["a", "b", "c"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="the head has 2 outputs but there are 3 label names"):
        write_expert_statistics(
            toy_expert[0],
            data,
            "toy",
            base_model_path=tiny_bert,
            out_dir=tmp_path / "expert",
            progress=False,
        )


def test_brought_adapter_needs_a_local_base_model(
    toy_expert: tuple[Path, TrainResult], tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", ["a"], ["x"])
    with pytest.raises(ValueError, match="'tiny-bert' is not a local folder"):
        write_expert_statistics(toy_expert[0], data, "toy", out_dir=tmp_path, progress=False)


def test_folder_without_safetensors_weights_is_rejected(tmp_path: Path) -> None:
    (tmp_path / ADAPTER_CONFIG).write_text('{"peft_type": "LORA"}')
    data = write_jsonl(tmp_path / "data.jsonl", ["a"], ["x"])
    with pytest.raises(ValueError, match="pickled weights are never read"):
        write_expert_statistics(tmp_path, data, "toy", progress=False)
