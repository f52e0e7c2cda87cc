"""The default training recipe's pieces: LP-FT head, class weights, min steps,
early stopping, and the quality figures recorded beside the expert."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moerge.client_training import TrainOptions, build, gate_config, train_config
from moerge.contributor_client.batching import encode, load_tokenizer
from moerge.contributor_client.build import build_expert
from moerge.contributor_client.linear_probe import fit_linear_probe, pooled_features, probe_head
from moerge.contributor_client.recipe import RECIPES, TrainConfig
from moerge.contributor_client.training import load_task_model, train_expert
from moerge.contributor_client.training_loop import class_weight_vector
from moerge.errors import MoergeError
from moerge.expert_format import STATISTICS_META, ExpertQuality, StatisticsMeta

from .toy import toy_config, toy_examples, write_jsonl


def _separable(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(n) % 3
    centres = torch.tensor([[4.0, 0.0, 1.0], [0.0, 4.0, 1.0], [-4.0, -4.0, 1.0]])
    features = centres[targets] * torch.tensor([1.0, 0.1, 2.0])
    return features + 0.3 * torch.randn(n, 3, generator=generator), targets


def test_linear_probe_is_the_optimum_of_the_logistic_regression_objective() -> None:
    features, targets = _separable()
    weight, bias = fit_linear_probe(features, targets, 3, c=1.0)
    assert bool(((features @ weight.T + bias).argmax(dim=-1) == targets).all())
    # In standardised coordinates the weights are (weight * std): the gradient of
    # sum CE + ||W||^2 / 2 vanishes there, i.e. these are the fitted regression's weights.
    x = features.double()
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False)
    w = (weight.double() * std).requires_grad_()
    b = (bias.double() + weight.double() @ mean).requires_grad_()
    loss = F.cross_entropy(((x - mean) / std) @ w.T + b, targets, reduction="sum")
    (loss + w.pow(2).sum() / 2).backward()
    assert w.grad is not None and b.grad is not None
    assert float(w.grad.abs().max()) < 1e-3 and float(b.grad.abs().max()) < 1e-3


def test_probe_initialised_head_holds_the_fitted_probe(tiny_bert: Path) -> None:
    texts, labels = toy_examples(40)
    tokenizer = load_tokenizer(str(tiny_bert))
    token_ids = encode(tokenizer, texts, 32)
    label_ids = [int(label == "sport") for label in labels]
    torch.manual_seed(0)
    model = load_task_model(str(tiny_bert), "classification", ["finance", "sport"], tokenizer)
    config = toy_config(tiny_bert)
    train_idx, val_idx = list(range(32)), list(range(32, 40))
    # The same features probe_head computes (train and validation rows in the same batches):
    # other batches pad differently, and float noise would move the fitted probe by ~1e-4.
    features = pooled_features(model, tokenizer, token_ids, train_idx + val_idx, config.batch_size)
    expected_w, expected_b = fit_linear_probe(
        features[:32], torch.tensor(label_ids[:32]), 2, config.probe_c
    )
    fit = probe_head(model, tokenizer, token_ids, label_ids, train_idx, val_idx, config, None)
    accuracy = fit.accuracy
    assert accuracy is not None and 0.0 <= accuracy <= 1.0
    torch.testing.assert_close(model.classifier.weight.detach(), expected_w)
    torch.testing.assert_close(model.classifier.bias.detach(), expected_b)


def test_class_weights_lift_rare_labels() -> None:
    ids = [0, 0, 0, 1]
    torch.testing.assert_close(class_weight_vector(ids, 2, "balanced"), torch.tensor([4 / 6, 2.0]))
    torch.testing.assert_close(
        class_weight_vector(ids, 2, "sqrt"), torch.tensor([4 / 6, 2.0]).sqrt()
    )
    assert class_weight_vector(ids, 2, "none") is None


def test_min_steps_adds_epochs_to_small_data(tiny_bert: Path, tmp_path: Path) -> None:
    texts, labels = toy_examples(40)  # 32 training examples: 2 steps per epoch
    config = toy_config(tiny_bert, epochs=1, min_steps=7, early_stopping=False)
    result = train_expert(texts, labels, config, tmp_path, progress=False)
    assert len(result.train_loss_curve) == 7
    assert result.best_step is None


def test_early_stopping_restores_the_best_checkpoint(tiny_bert: Path, tmp_path: Path) -> None:
    """A learning rate that wrecks the model: without early stopping the last step is kept,
    with it the best evaluation (at worst the starting linear probe) is restored."""
    texts, labels = toy_examples(100)
    wrecking = toy_config(tiny_bert, epochs=4, learning_rate=3.0, min_steps=0, patience=99)
    kept = train_expert(
        texts,
        labels,
        dataclasses.replace(wrecking, early_stopping=False),
        tmp_path / "a",
        progress=False,
    )
    restored = train_expert(texts, labels, wrecking, tmp_path / "b", progress=False)
    assert restored.best_step is not None
    assert restored.val_accuracy is not None and kept.val_accuracy is not None
    assert restored.probe_val_accuracy is not None
    assert restored.val_accuracy >= restored.probe_val_accuracy
    assert restored.val_accuracy > kept.val_accuracy


def test_a_kept_probe_is_refitted_on_all_examples(tiny_bert: Path, tmp_path: Path) -> None:
    """When no tuned checkpoint beats the probe, the saved head is the probe refitted on
    training + validation examples (``probe_refit``); the reported validation figures stay
    those of the training-split probe."""
    texts, labels = toy_examples(100)
    wrecking = toy_config(tiny_bert, epochs=2, learning_rate=3.0, min_steps=0)
    refitted = train_expert(texts, labels, wrecking, tmp_path / "a", progress=False)
    held_out = train_expert(
        texts,
        labels,
        dataclasses.replace(wrecking, probe_refit=False),
        tmp_path / "b",
        progress=False,
    )
    assert refitted.best_step == held_out.best_step == 0
    assert refitted.val_accuracy == held_out.val_accuracy
    assert refitted.val_accuracy == pytest.approx(held_out.probe_val_accuracy)
    assert refitted.val_loss == held_out.val_loss
    key = "base_model.model.classifier.weight"
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))[key]
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))[key]
    assert not torch.allclose(a, b)


def test_legacy_recipe_and_overrides_reach_the_config(tiny_bert: Path) -> None:
    legacy = train_config(str(tiny_bert), None, TrainOptions(recipe="legacy"))
    assert (legacy.probe_init, legacy.early_stopping, legacy.min_steps) == (False, False, 0)
    assert legacy.learning_rate == RECIPES["legacy"]["learning_rate"]
    tuned = train_config(
        str(tiny_bert), None, TrainOptions(learning_rate=1e-4, class_weighting="balanced")
    )
    assert (tuned.learning_rate, tuned.class_weighting, tuned.probe_init) == (
        1e-4,
        "balanced",
        True,
    )


def test_quality_figures_are_written_to_statistics_json_and_read_back(
    tiny_bert: Path, tmp_path: Path
) -> None:
    texts, labels = toy_examples(60)
    data = write_jsonl(tmp_path / "data.jsonl", texts, labels)
    report = build_expert(
        data,
        tmp_path / "expert",
        "toy",
        toy_config(tiny_bert, epochs=1, min_steps=0),
        with_gates=False,
        progress=False,
    )
    meta = StatisticsMeta.read(tmp_path / "expert" / STATISTICS_META)
    assert meta.quality == report.meta.quality
    assert meta.quality is not None and meta.quality.validation_examples == 12
    assert meta.quality.validation_accuracy == report.train.val_accuracy
    assert meta.quality.majority_accuracy == 0.5  # balanced toy labels
    assert meta.quality.probe_accuracy is not None


def test_statistics_json_without_quality_still_loads(tmp_path: Path) -> None:
    old = {"example_count": 3, "hidden_size": 4, "covariance_rank": 0, "task_name": "t"}
    assert StatisticsMeta.from_dict(old).quality is None
    path = tmp_path / STATISTICS_META
    path.write_text(json.dumps(old))
    assert StatisticsMeta.read(path).quality is None


@pytest.mark.parametrize(
    "quality",
    [
        {"validation_accuracy": 1.5},
        {"probe_accuracy": -0.1},
        {"validation_loss": float("nan")},
        {"validation_examples": -1},
        {"majority_accuracy": True},
        {"surprise": 1},
    ],
)
def test_out_of_range_quality_is_rejected(quality: dict[str, object]) -> None:
    raw = {
        "example_count": 3,
        "hidden_size": 4,
        "covariance_rank": 0,
        "task_name": "t",
        "quality": quality,
    }
    with pytest.raises(ValueError, match="quality"):
        StatisticsMeta.from_dict(raw)


def test_causal_lm_reports_its_loss_beside_the_base_model(tiny_llama: Path, tmp_path: Path) -> None:
    prompts = [f"question {i}:" for i in range(20)]
    answers = ["yes" if i % 2 else "no" for i in range(20)]
    config = TrainConfig(
        base_model=str(tiny_llama),
        task_type="causal_lm",
        epochs=2,
        learning_rate=1e-2,
        validation_fraction=0.2,
    )
    result = train_expert(prompts, answers, config, tmp_path, progress=False)
    quality = result.quality()
    assert isinstance(quality, ExpertQuality)
    assert quality.validation_loss is not None and quality.base_validation_loss is not None
    assert quality.probe_accuracy is None and quality.majority_accuracy is None
    assert len(result.train_loss_curve) <= 2 * 2  # 16 examples, batch 16, 2 epochs


def test_report_warns_when_the_expert_does_not_beat_its_baselines() -> None:
    from moerge.cli.expert_report import quality_warnings

    good = ExpertQuality(10, validation_accuracy=0.9, probe_accuracy=0.8, majority_accuracy=0.5)
    assert quality_warnings(good) == []
    weak = ExpertQuality(10, validation_accuracy=0.5, probe_accuracy=0.8, majority_accuracy=0.5)
    assert len(quality_warnings(weak)) == 2
    lm = ExpertQuality(10, validation_loss=2.0, base_validation_loss=1.5)
    assert ["base model" in w for w in quality_warnings(lm)] == [True]


def test_head_learning_rate_moves_the_head_apart_from_the_adapter(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """With a head rate of ~0 the probe-initialised head stays put (the same after one epoch
    as after three) while the LoRA factors, at their own rate, keep moving."""
    from safetensors.torch import load_file

    texts, labels = toy_examples(60)
    frozen_head = toy_config(tiny_bert, head_learning_rate=1e-12, min_steps=0, early_stopping=False)
    weights = []
    for epochs in (1, 3):
        out = tmp_path / str(epochs)
        train_expert(
            texts, labels, dataclasses.replace(frozen_head, epochs=epochs), out, progress=False
        )
        weights.append(load_file(str(out / "adapter_model.safetensors")))
    head = [k for k in weights[0] if "classifier" in k]
    lora_b = [k for k in weights[0] if "lora_B" in k]
    assert head and lora_b
    for key in head:
        torch.testing.assert_close(weights[0][key], weights[1][key])
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in lora_b)
    assert any(float(weights[1][k].abs().max()) > 0 for k in lora_b)


def test_head_learning_rate_option_reaches_the_config(tiny_bert: Path) -> None:
    config = train_config(str(tiny_bert), None, TrainOptions(head_learning_rate=1e-4))
    assert config.head_learning_rate == 1e-4
    assert train_config(str(tiny_bert), None, TrainOptions()).head_learning_rate is None
    with pytest.raises(ValueError, match="head_learning_rate"):
        TrainConfig(base_model="m", head_learning_rate=0.0).validate()


def test_gate_learning_rate_option_reaches_the_gate_config() -> None:
    assert gate_config(TrainOptions(gate_learning_rate=5e-3)).learning_rate == 5e-3
    assert gate_config(TrainOptions()).learning_rate == 5e-2  # the default: gates.py says why
    assert gate_config(TrainOptions(gate_steps=30, seed=3)).steps == 30


def test_bad_gate_learning_rate_is_refused_before_training(tmp_path: Path) -> None:
    data = tmp_path / "never-read.jsonl"  # refused before the data or the model is touched
    options = TrainOptions(gate_learning_rate=-1.0)
    with pytest.raises(MoergeError, match="learning_rate must be positive"):
        build(data, tmp_path / "out", "task", "", options, TrainConfig(base_model="m"), None, False)
    assert not (tmp_path / "out").exists()
    # without gates the value is never used, so it is not an error
    assert gate_config(TrainOptions(gates=False, gate_learning_rate=-1.0)).learning_rate == -1.0
