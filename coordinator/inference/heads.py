"""Classification heads of experts, read from the PEFT adapter file without building a model.

A classification expert is ``AutoModelForSequenceClassification`` + LoRA; PEFT saves its head
through ``modules_to_save`` as ``base_model.model.classifier.{weight,bias}``. For BERT-family
encoders ``BertForSequenceClassification`` computes ``classifier(dropout(pooler_output))``; in
eval mode dropout is the identity, so the engine runs the shared encoder + pooler once and
applies each expert's head as ``logits = pooled @ W^T + b``. The label names (in head order) come
from ``statistics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moerge.coordinator.inference.errors import IncompatibleExpert
from moerge.expert_format import STATISTICS_META, StatisticsMeta

#: Final key components of the head's tensors in a PEFT ``SEQ_CLS`` adapter file.
HEAD_WEIGHT = "classifier.weight"
HEAD_BIAS = "classifier.bias"


@dataclass(frozen=True)
class ClassificationHead:
    """``logits = pooled @ weight^T + bias``: ``weight`` [L, H], ``bias`` [L]."""

    weight: torch.Tensor
    bias: torch.Tensor
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        """Labels the head scores."""
        return int(self.weight.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the head's weight and bias."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias))

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled`` [N, H] -> logits [N, L] (float32)."""
        return torch.nn.functional.linear(
            pooled.to(self.weight.dtype), self.weight, self.bias
        ).float()

    def to(
        self, device: torch.device | str, dtype: torch.dtype | None = None
    ) -> ClassificationHead:
        """A copy on ``device`` (and in ``dtype``), labels kept."""
        return ClassificationHead(
            self.weight.to(device=device, dtype=dtype),
            self.bias.to(device=device, dtype=dtype),
            self.label_names,
        )

    def aligned_to(self, label_names: tuple[str, ...]) -> ClassificationHead:
        """The same head with its rows permuted into the order of ``label_names`` (same set)."""
        if label_names == self.label_names:
            return self
        order = torch.tensor([self.label_names.index(name) for name in label_names])
        order = order.to(self.weight.device)
        return ClassificationHead(self.weight[order], self.bias[order], tuple(label_names))


def head_from_state_dict(
    state: dict[str, torch.Tensor], label_names: list[str] | tuple[str, ...], hidden_size: int
) -> ClassificationHead:
    """Find ``classifier.{weight,bias}`` in a PEFT adapter state dict and check its shapes.

    Empty ``label_names`` default to transformers' ``LABEL_<i>``.
    """
    weights = [k for k in state if k.endswith(HEAD_WEIGHT) and "lora_" not in k]
    biases = [k for k in state if k.endswith(HEAD_BIAS) and "lora_" not in k]
    if len(weights) != 1 or len(biases) != 1:
        nested = sorted(k for k in state if ".classifier." in k and "lora_" not in k)
        detail = f" (found {nested}: only a linear classifier is supported)" if nested else ""
        raise IncompatibleExpert(
            f"a classification expert needs exactly one '{HEAD_WEIGHT}' and one '{HEAD_BIAS}' "
            f"tensor saved through modules_to_save{detail}"
        )
    weight = state[weights[0]].float()
    bias = state[biases[0]].float()
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise IncompatibleExpert(
            f"classifier weight has shape {list(weight.shape)}, expected [labels, {hidden_size}]"
        )
    if tuple(bias.shape) != (weight.shape[0],):
        raise IncompatibleExpert(
            f"classifier bias has shape {list(bias.shape)}, expected [{weight.shape[0]}]"
        )
    names = tuple(label_names) or tuple(f"LABEL_{i}" for i in range(weight.shape[0]))
    if len(names) != weight.shape[0]:
        raise IncompatibleExpert(
            f"statistics.json names {len(names)} labels but the head has {weight.shape[0]}"
        )
    if len(set(names)) != len(names):
        raise IncompatibleExpert(f"duplicate label names {list(names)}")
    return ClassificationHead(weight.contiguous(), bias.contiguous(), names)


def read_label_names(folder: str | Path) -> list[str]:
    """``label_names`` of ``statistics.json`` (empty when the file or the field is absent)."""
    path = Path(folder) / STATISTICS_META
    if not path.exists():
        return []
    try:
        return list(StatisticsMeta.read(path).label_names)
    except ValueError as exc:
        raise IncompatibleExpert(str(exc)) from None
