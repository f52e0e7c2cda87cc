"""PEFT LoRA adapter files -> the LoRA bank's factors.

A PEFT adapter is ``adapter_model.safetensors`` (keys ``base_model.model.<path>.lora_A.weight``
and ``...lora_B.weight``) plus ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``,
``rank_pattern``, ``alpha_pattern``, ...). The bank (:mod:`.lora_bank`) stores each module's
``(A [r, d_in], B [d_out, r], scaling)``; this module reads them as PEFT's ``tuners/lora`` defines
them, and refuses what the bank cannot serve (DoRA, LoRA biases, fan-in-fan-out layers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TypeVar

import torch

_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?"
    r"\.weight$"
)


def lora_weights_from_peft(
    state_dict: Mapping[str, torch.Tensor], adapter_config: Mapping[str, object]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Parse a PEFT adapter (``adapter_model.safetensors`` state dict and
    ``adapter_config.json``) into ``module path -> (A [r, d_in], B [d_out, r], scaling)``.

    Keys look like ``base_model.model.<path>.lora_A.weight`` (an in-memory state dict's
    ``lora_A.<adapter>.weight`` is accepted too); other keys (task heads saved through
    ``modules_to_save``) are ignored. ``scaling = lora_alpha / r``, or
    ``lora_alpha / sqrt(r)`` with ``use_rslora``; PEFT's ``rank_pattern`` and
    ``alpha_pattern`` apply per module, the rank being read from the tensors.
    """
    for flag in ("use_dora", "fan_in_fan_out"):
        if adapter_config.get(flag):
            raise ValueError(f"adapter uses {flag}, which the LoRA bank does not support")
    if adapter_config.get("lora_bias"):
        raise ValueError("adapter trains LoRA biases, which the LoRA bank does not support")
    peft_type = adapter_config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"adapter is of type {peft_type!r}, not LORA")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            continue
        factors.setdefault(match["module"], {})[match["which"]] = tensor
    if not factors:
        raise ValueError("no LoRA weights (keys '*.lora_A.weight') in the adapter")
    alpha = float(adapter_config.get("lora_alpha", 8))  # type: ignore[arg-type]
    alpha_pattern = dict(adapter_config.get("alpha_pattern") or {})  # type: ignore[call-overload]
    rslora = bool(adapter_config.get("use_rslora", False))
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"module {module!r} has lora_{next(iter(pair))} only")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"module {module!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are "
                "not [r, d_in] and [d_out, r] (only linear layers are supported)"
            )
        r = A.shape[0]
        module_alpha = float(_pattern_value(module, alpha_pattern, alpha))
        scaling = module_alpha / math.sqrt(r) if rslora else module_alpha / r
        out[module] = (A, B, scaling)
    return out


V = TypeVar("V")


def _pattern_value(module: str, pattern: Mapping[str, V], default: V) -> V:
    """PEFT's ``get_pattern_key``: the first pattern key matching the end of the module path."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
