"""PHATGOOSE gates: one vector per LoRA module, trained with everything else frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from moerge.contributor_client.batching import load_tokenizer
from moerge.contributor_client.gates import GateConfig, LoraGates, lora_layers, train_gates
from moerge.contributor_client.training import TrainResult

from .toy import toy_examples


def load_expert(tiny_bert: Path, adapter_dir: Path) -> PeftModel:
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    return PeftModel.from_pretrained(base, adapter_dir)


def toy_gates(tiny_bert: Path, model: PeftModel, steps: int = 30) -> dict[str, torch.Tensor]:
    texts, labels = toy_examples(64)
    label_ids = [["finance", "sport"].index(label) for label in labels]
    config = GateConfig(steps=steps, learning_rate=5e-2, batch_size=16)
    return train_gates(
        model, load_tokenizer(str(tiny_bert)), texts, label_ids, config, progress=False
    )


def test_one_gate_per_lora_module_keyed_by_base_model_path(
    tiny_bert: Path, toy_expert: tuple[Path, TrainResult]
) -> None:
    gates = toy_gates(tiny_bert, load_expert(tiny_bert, toy_expert[0]), steps=2)
    expected = [
        f"encoder.layer.{layer}.attention.self.{name}"
        for layer in (0, 1)
        for name in ("query", "value")
    ]
    assert list(gates) == expected
    base_modules = dict(AutoModel.from_pretrained(tiny_bert).named_modules())
    for name, gate in gates.items():
        assert gate.shape == (base_modules[name].in_features,)
        assert not gate.requires_grad


def test_gates_move_from_init_while_the_expert_stays_frozen(
    tiny_bert: Path, toy_expert: tuple[Path, TrainResult]
) -> None:
    model = load_expert(tiny_bert, toy_expert[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    gates = toy_gates(tiny_bert, model)
    assert all(gate.abs().max() > 1e-3 for gate in gates.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}


def test_gate_scales_the_lora_term_by_sigmoid_of_its_input(tiny_bert: Path) -> None:
    torch.manual_seed(0)
    base = AutoModel.from_pretrained(tiny_bert)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query"], init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    name, layer = next(iter(lora_layers(model).items()))
    x = torch.randn(2, 5, layer.in_features)  # [B, T, d_in]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # [r, d_in], [d_out, r]
    scaling = layer.scaling["default"]
    with torch.no_grad(), LoraGates(model) as gates:
        gates.gates[name].copy_(torch.randn(layer.in_features))
        gated = layer(x)
        v = gates.gates[name]
        base_out = layer.base_layer(x)
        expected = base_out + torch.sigmoid(x @ v)[..., None] * (x @ a.T @ b.T) * scaling
    torch.testing.assert_close(gated, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ungated = layer(x)  # hooks are gone once the context is left
    torch.testing.assert_close(ungated, base_out + (x @ a.T @ b.T) * scaling)


def test_zero_gate_halves_the_lora_term(tiny_bert: Path) -> None:
    torch.manual_seed(0)
    base = AutoModel.from_pretrained(tiny_bert)
    config = LoraConfig(r=4, target_modules=["value"], init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    layer = next(iter(lora_layers(model).values()))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        full = layer(x) - layer.base_layer(x)
        with LoraGates(model, init=0.0):
            half = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(half, 0.5 * full)


def test_causal_lm_gates_train_with_the_lm_loss(tiny_llama: Path) -> None:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, init_lora_weights=False)
    model = get_peft_model(base, config)
    texts, _ = toy_examples(32)
    gates = train_gates(
        model,
        load_tokenizer(str(tiny_llama)),
        texts,
        None,
        GateConfig(steps=5, learning_rate=5e-2),
        causal_lm=True,
        progress=False,
    )
    modules = [f"layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert list(gates) == modules
    assert all(gate.abs().max() > 0 for gate in gates.values())


def test_classification_gates_need_labels(
    tiny_bert: Path, toy_expert: tuple[Path, TrainResult]
) -> None:
    model = load_expert(tiny_bert, toy_expert[0])
    with pytest.raises(ValueError, match="one label id per text"):
        train_gates(
            model, load_tokenizer(str(tiny_bert)), ["a b"], None, GateConfig(), progress=False
        )
