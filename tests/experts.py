"""Build valid (and deliberately broken) expert folders on tiny models, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from moerge.expert_format import (
    COV_DIAG_KEY,
    COV_FACTOR_KEY,
    MEAN_KEY,
    STATISTICS_META,
    STATISTICS_TENSORS,
    StatisticsMeta,
    gate_key,
)


def make_expert_dir(
    base_model: str | Path,
    out: str | Path,
    labels: tuple[str, ...] = ("neg", "pos"),
    rank: int = 4,
    seed: int = 0,
    task_name: str = "toy",
    mean: torch.Tensor | None = None,
    task_type: str = "classification",
    targets: tuple[str, ...] | None = None,
    gates: bool = True,
) -> Path:
    """A PEFT LoRA adapter with non-zero A and B, plus consistent statistics."""
    out = Path(out)
    torch.manual_seed(seed)
    if task_type == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base_model), num_labels=len(labels)
        )
        peft_task = TaskType.SEQ_CLS
        targets = targets or ("query", "value")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base_model))
        peft_task = TaskType.CAUSAL_LM
        targets = targets or ("q_proj", "v_proj")
    peft_model = get_peft_model(
        model,
        LoraConfig(task_type=peft_task, r=rank, lora_alpha=2 * rank, target_modules=list(targets)),
    )
    modules = []
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.2)
            path = name.removeprefix("base_model.model.")
            if task_type == "classification":
                path = path.split(".", 1)[1]  # drop "bert."
            modules.append((path, module.lora_A["default"].weight.shape[1]))
    peft_model.save_pretrained(str(out))
    hidden = AutoConfig.from_pretrained(str(base_model)).hidden_size
    generator = torch.Generator().manual_seed(seed + 1000)
    centre = mean if mean is not None else torch.randn(hidden, generator=generator)
    tensors = {
        MEAN_KEY: centre.float().contiguous(),
        COV_DIAG_KEY: torch.full((hidden,), 0.01),
        COV_FACTOR_KEY: 0.05 * torch.randn(hidden, 2, generator=generator),
    }
    gate_modules = []
    if gates:
        for path, d_in in modules:
            tensors[gate_key(path)] = torch.randn(d_in, generator=generator)
            gate_modules.append(path)
    save_file(tensors, str(out / STATISTICS_TENSORS))
    StatisticsMeta(
        example_count=50,
        hidden_size=hidden,
        covariance_rank=2,
        task_name=task_name,
        task_type=task_type,
        label_names=list(labels) if task_type == "classification" else [],
        label_counts=[25] * len(labels) if task_type == "classification" else [],
        gate_modules=sorted(gate_modules),
    ).write(out / STATISTICS_META)
    return out


def rewrite_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
