"""Read a PEFT LoRA adapter directory into :class:`LoraModuleWeights` keyed by module path.

An expert's adapter is PEFT's own ``adapter_config.json`` + ``adapter_model.safetensors``
(:mod:`moerge.expert_format`). Saved keys look like
``base_model.model.encoder.layer.0.attention.self.query.lora_A.weight``; the module path in the
base model is what lies between the ``base_model.model.`` prefix and ``.lora_A.weight``. The
scaling is PEFT's: ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), with ``r`` and
``alpha`` resolved through ``rank_pattern`` / ``alpha_pattern`` exactly as PEFT resolves them.
Non-LoRA keys (e.g. ``modules_to_save`` heads) are ignored. Only safetensors and JSON are read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from moerge.expert_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from moerge.router_training.base import LoraModuleWeights

PEFT_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


def read_peft_lora(adapter_dir: str | Path, strip_prefix: str = "") -> dict[str, LoraModuleWeights]:
    """The LoRA modules of a saved PEFT adapter, keyed by module path in the base model.

    ``strip_prefix`` is removed from module paths as well (e.g. ``"bert."`` for an adapter
    trained on ``BertForSequenceClassification`` when routing in ``BertModel``).
    """
    from peft.utils.other import get_pattern_key  # lazy: importing peft takes seconds

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir}: not a LoRA adapter (peft_type={config['peft_type']!r})")
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    default_r = int(config.get("r", 8))
    default_alpha = float(config.get("lora_alpha", default_r))
    rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraModuleWeights] = {}
    for key, a in tensors.items():
        if not key.endswith(_A_SUFFIX):
            continue
        path = key[: -len(_A_SUFFIX)]
        b = tensors.get(path + _B_SUFFIX)
        if b is None:
            raise ValueError(f"{adapter_dir}: {key} has no matching lora_B")
        if path.startswith(PEFT_PREFIX):
            path = path[len(PEFT_PREFIX) :]
        r = int(rank_pattern.get(get_pattern_key(list(rank_pattern), path), default_r))
        alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), path), default_alpha))
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        if strip_prefix and path.startswith(strip_prefix):
            path = path[len(strip_prefix) :]
        modules[path] = LoraModuleWeights(
            A=a.to(torch.float32), B=b.to(torch.float32), scaling=scaling
        )
    if not modules:
        raise ValueError(f"{adapter_dir}: no LoRA weights found")
    return modules


def peft_lora_loader(
    adapter_dir: str | Path, strip_prefix: str = ""
) -> Callable[[], dict[str, LoraModuleWeights]]:
    """A lazy ``ExpertRecord.load_lora`` for a saved PEFT adapter directory."""
    return lambda: read_peft_lora(adapter_dir, strip_prefix)
