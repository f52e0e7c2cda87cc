"""Adapter-only experts: a PEFT LoRA folder whose training data is gone joins the registry.

Every expert is uploaded as four files (:mod:`moerge.expert_format`). An adapter trained
elsewhere (another lab, a model hub) has only PEFT's two; this module writes the other two
without any data: ``statistics.json`` with ``embedding_statistics: false`` (task name, label
names, base model; ``example_count`` 0) and an empty ``statistics.safetensors``. The coordinator
validates the adapter as any other; routers that learn from data statistics or gates leave it
out, Arrow routes it from the LoRA weights (docs/routing.md).

What is read from the adapter, with safetensors and JSON only:

* ``task_type``: PEFT's ``SEQ_CLS`` is a classification expert, ``CAUSAL_LM`` a causal LM;
* ``hidden_size``: the head's input size (``classifier.weight`` [L, H]) for classification,
  else the input size most of the LoRA ``A`` factors share ([r, d_in]: attention projections
  read the hidden state);
* label names: given by the user in head order, else ``LABEL_0 .. LABEL_{L-1}`` (the names
  ``transformers`` gives a head without ``id2label``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from safetensors import safe_open
from safetensors.numpy import save_file

from moerge.expert_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    STATISTICS_META,
    STATISTICS_TENSORS,
    adapter_only_meta,
)

#: PEFT task types -> moerge task types.
TASK_TYPES = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal_lm"}
HEAD_WEIGHT_SUFFIX = "classifier.weight"


def _shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(weights), framework="numpy") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


def describe_adapter(adapter_dir: Path) -> tuple[str, int, int]:
    """``(task_type, hidden_size, num_labels)`` of a PEFT LoRA folder (num_labels 0 for LMs)."""
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{adapter_dir} lacks {path.name} (a PEFT adapter folder)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    peft_type = config.get("task_type")
    if peft_type not in TASK_TYPES:
        raise ValueError(
            f"{config_path}: task_type {peft_type!r}; adapter-only experts must be one of "
            f"{sorted(TASK_TYPES)}"
        )
    shapes = _shapes(weights_path)
    head = [s for k, s in shapes.items() if k.endswith(HEAD_WEIGHT_SUFFIX) and len(s) == 2]
    if TASK_TYPES[peft_type] == "classification":
        if not head:
            raise ValueError(f"{weights_path}: a SEQ_CLS adapter must hold its classifier head")
        return "classification", head[0][1], head[0][0]
    inputs = Counter(s[1] for k, s in shapes.items() if "lora_A" in k and len(s) == 2)
    if not inputs:
        raise ValueError(f"{weights_path}: no LoRA A factors")
    return "causal_lm", inputs.most_common(1)[0][0], 0


def write_adapter_only(
    adapter_dir: str | Path,
    out_dir: str | Path,
    task_name: str,
    label_names: list[str] | None = None,
    task_description: str = "",
) -> Path:
    """An uploadable expert folder at ``out_dir``: the adapter's two files (hard-linked when
    possible) plus statistics that claim no data. Returns ``out_dir``."""
    source, out = Path(adapter_dir), Path(out_dir)
    task_type, hidden_size, num_labels = describe_adapter(source)
    if not task_name:
        raise ValueError("an adapter-only expert needs a task name")
    if label_names is None:
        label_names = [f"LABEL_{i}" for i in range(num_labels)]
    if task_type == "classification" and len(label_names) != num_labels:
        raise ValueError(
            f"{len(label_names)} label names for a head of {num_labels} labels "
            f"(give them in the head's order)"
        )
    config = json.loads((source / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    meta = adapter_only_meta(
        task_name,
        hidden_size,
        list(label_names) if task_type == "classification" else [],
        task_type=task_type,
        task_description=task_description,
        base_model_id=str(config.get("base_model_name_or_path") or ""),
    )
    out.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        target = out / name
        target.unlink(missing_ok=True)
        try:
            os.link(source / name, target)
        except OSError:
            shutil.copyfile(source / name, target)
    meta.write(out / STATISTICS_META)
    save_file({}, str(out / STATISTICS_TENSORS))
    return out
