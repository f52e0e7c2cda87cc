"""Training a LoRA expert: PEFT's files, learning, reproducibility, causal LM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from moerge.contributor_client.batching import collate, encode, load_tokenizer
from moerge.contributor_client.data import train_validation_split
from moerge.contributor_client.recipe import TrainConfig
from moerge.contributor_client.training import TrainResult, train_expert
from moerge.expert_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS

from .toy import toy_config, toy_examples

MODULES = [
    f"base_model.model.bert.encoder.layer.{layer}.attention.self.{name}.lora_{ab}.weight"
    for layer in (0, 1)
    for name in ("query", "value")
    for ab in ("A", "B")
]


def test_expert_folder_holds_exactly_peft_files_with_the_head(
    toy_expert: tuple[Path, TrainResult],
) -> None:
    out_dir, _ = toy_expert
    assert sorted(p.name for p in out_dir.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    weights = load_file(str(out_dir / ADAPTER_WEIGHTS))
    head = ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    assert sorted(weights) == sorted(MODULES + head)
    assert weights["base_model.model.classifier.weight"].shape == (2, 32)
    assert weights[MODULES[0]].shape == (8, 32)  # lora_A [r, d_in]
    config = json.loads((out_dir / ADAPTER_CONFIG).read_text())
    assert config["task_type"] == "SEQ_CLS"
    assert config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert "classifier" in config["modules_to_save"]
    assert config["base_model_name_or_path"] == "tiny-bert"
    assert (config["r"], config["lora_alpha"]) == (8, 16)


def test_expert_learns_a_separable_task(toy_expert: tuple[Path, TrainResult]) -> None:
    _, result = toy_expert
    assert result.label_names == ["finance", "sport"]
    assert result.val_count == 40 and result.train_count == 160
    assert result.val_accuracy is not None and result.val_accuracy >= 0.9
    curve = result.train_loss_curve
    # 6 epochs of 160 / 16 steps, raised to min_steps; early stopping may end it sooner.
    assert 0 < len(curve) <= max(6 * 10, TrainConfig(base_model="").min_steps)
    assert sum(curve[-10:]) / 10 < 0.5 * sum(curve[:10]) / 10


def test_saved_adapter_reloads_with_peft_and_reproduces_val_accuracy(
    tiny_bert: Path, toy_expert: tuple[Path, TrainResult]
) -> None:
    out_dir, result = toy_expert
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = PeftModel.from_pretrained(base, out_dir).eval()
    texts, labels = toy_examples(200)
    _, validation = train_validation_split(labels, len(texts), 0.2, seed=0)
    tokenizer = load_tokenizer(str(tiny_bert))
    ids = encode(tokenizer, [texts[i] for i in validation], max_length=128)
    targets = [result.label_names.index(labels[i]) for i in validation]
    batch = collate(ids, tokenizer, targets)
    with torch.no_grad():
        predicted = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    accuracy = (predicted.argmax(dim=-1) == batch["labels"]).float().mean().item()
    assert accuracy == pytest.approx(result.val_accuracy)


def test_same_seed_gives_identical_weights_and_another_seed_does_not(
    tiny_bert: Path, tmp_path: Path
) -> None:
    texts, labels = toy_examples(48)
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        config = toy_config(tiny_bert, epochs=1, seed=seed, lora_dropout=0.1)
        train_expert(texts, labels, config, tmp_path / name, progress=False)
        runs[name] = load_file(str(tmp_path / name / ADAPTER_WEIGHTS))
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_training_leaves_the_global_rng_alone(tiny_bert: Path, tmp_path: Path) -> None:
    texts, labels = toy_examples(16)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_expert(texts, labels, toy_config(tiny_bert, epochs=1), tmp_path, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_max_examples_trains_on_a_subset(tiny_bert: Path, tmp_path: Path) -> None:
    texts, labels = toy_examples(100)
    config = toy_config(tiny_bert, epochs=1, max_examples=30, validation_fraction=0.1)
    result = train_expert(texts, labels, config, tmp_path, progress=False)
    assert result.train_count + result.val_count == 30


def test_causal_lm_expert_saves_lora_weights_only(tiny_llama: Path, tmp_path: Path) -> None:
    texts, _ = toy_examples(40)
    config = TrainConfig(
        base_model=str(tiny_llama), task_type="causal_lm", epochs=2, learning_rate=1e-2
    )
    result = train_expert(texts, None, config, tmp_path, progress=False)
    weights = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert any(k.endswith("self_attn.q_proj.lora_A.weight") for k in weights)
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["task_type"] == "CAUSAL_LM"
    assert result.label_names == []
    assert result.val_accuracy is not None and 0.0 <= result.val_accuracy <= 1.0
    assert result.train_loss_curve[-1] < result.train_loss_curve[0]


def test_classification_needs_two_distinct_labels(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least two distinct labels"):
        train_expert(["a", "b"], ["x", "x"], toy_config(tiny_bert), tmp_path, progress=False)
    with pytest.raises(ValueError, match="needs a label"):
        train_expert(["a", "b"], None, toy_config(tiny_bert), tmp_path, progress=False)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("task_type", "regression"),
        ("lora_rank", 0),
        ("validation_fraction", 1.0),
        ("learning_rate", -1.0),
        ("max_examples", 1),
    ],
)
def test_invalid_config_is_rejected_naming_the_field(field: str, value: object) -> None:
    config = TrainConfig(base_model="unused")
    setattr(config, field, value)
    with pytest.raises(ValueError, match=field):
        config.validate()


def test_bf16_autocast_learns_and_saves_float32_weights(tiny_bert: Path, tmp_path: Path) -> None:
    texts, labels = toy_examples(200)
    result = train_expert(texts, labels, toy_config(tiny_bert, bf16=True), tmp_path, progress=False)
    assert result.val_accuracy is not None and result.val_accuracy >= 0.9
    weights = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())
