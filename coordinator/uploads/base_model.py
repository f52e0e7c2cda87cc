"""What every expert must be compatible with: the base model's identity and layer shapes.

Uploads are checked against this (tensor names and shapes of LoRA factors, hidden size of the
statistics) without loading any weights: the model is built on torch's ``meta`` device from its
config alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from moerge.base_model import model_revision
from moerge.coordinator.uploads.privacy_policy import PrivacyPolicy


@dataclass(frozen=True)
class BaseModelSpec:
    """The base model experts must be trained against: id, local path, content revision, task type
    and the linear modules a LoRA may target."""

    model_id: str
    path: str
    revision: str  # sha256 over the weight files (name + content), so any change is visible
    task_type: str
    hidden_size: int
    #: module path in the base model -> (d_out, d_in), for every nn.Linear a LoRA may target
    linear_shapes: dict[str, tuple[int, int]]
    allowed_targets: tuple[str, ...]
    max_lora_rank: int
    #: what uploaded experts must declare about privacy (checked with the rest at validation)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)

    def target_shapes(self) -> dict[str, tuple[int, int]]:
        """Linear modules whose last name component is an allowed LoRA target."""
        return {
            name: shape
            for name, shape in self.linear_shapes.items()
            if name.rsplit(".", 1)[-1] in self.allowed_targets
        }


def describe_base_model(
    path: str | Path,
    model_id: str,
    task_type: str,
    allowed_targets: tuple[str, ...],
    max_lora_rank: int,
    privacy: PrivacyPolicy | None = None,
) -> BaseModelSpec:
    """Read config + weights' digest; enumerate linear layers on the meta device."""
    config = AutoConfig.from_pretrained(str(path))
    auto = AutoModelForCausalLM if task_type == "causal_lm" else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config)
    shapes = {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if not hidden:
        raise ValueError(f"cannot tell the hidden size of the model at {path}")
    return BaseModelSpec(
        model_id=model_id,
        path=str(path),
        revision=model_revision(path),
        task_type=task_type,
        hidden_size=int(hidden),
        linear_shapes=shapes,
        allowed_targets=tuple(allowed_targets),
        max_lora_rank=max_lora_rank,
        privacy=privacy or PrivacyPolicy(),
    )
