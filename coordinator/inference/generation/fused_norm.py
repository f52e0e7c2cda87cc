"""RMSNorm in one fused kernel for the decode step on a GPU.

A Llama-style decoder normalises twice per layer (and once at the end) with::

    y = weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)       statistics in float32

which transformers writes as seven tensor operations (a cast in, ``pow``, ``mean``, ``add``,
``rsqrt``, ``mul``, a cast out) and the weight's ``mul``. In a decode step of a 1.1B model at 32
rows each of them is a kernel of a few microseconds on a tensor of 32 x 2048, so the 45 norms
cost about 360 kernel launches of a step whose weights take 0.74 ms to read (see
:mod:`.cuda_graphs`): the number of kernels, not the bytes, sets their cost.

PyTorch (2.8 and later) has a fused RMSNorm kernel on CUDA behind :func:`torch.nn.functional.
rms_norm`: one kernel that computes the statistics in float32 and writes the normalised row in
the input's dtype, exactly the ``(...).to(x.dtype)`` above. Multiplying by the weight afterwards,
in the input's dtype, keeps transformers' rounding (two roundings in half precision), so the
swap changes a result only through the order of the float32 sum: two kernels instead of eight.

:func:`use_fused_rms_norm` swaps the ``forward`` of every norm module of a model whose own
``forward`` is Llama's formula, found by comparing the source (Llama, Mistral, Qwen2/3 and the
other models transformers generates from Llama's code share it); other norms (Gemma's
``1 + weight``, say) are left alone. It only does so on CUDA, where the kernel is fused.
"""

from __future__ import annotations

import inspect
import textwrap
import types

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

__all__ = ["fused_rms_norm_forward", "use_fused_rms_norm"]


_SOURCES: dict[type[torch.nn.Module], str | None] = {}


def _normalised_source(cls: type[torch.nn.Module]) -> str | None:
    """``cls.forward``'s source without indentation or blank lines; None if unreadable."""
    if cls not in _SOURCES:
        try:
            lines = textwrap.dedent(inspect.getsource(cls.forward)).splitlines()
        except (OSError, TypeError):
            _SOURCES[cls] = None
        else:
            stripped = (line.strip() for line in lines)
            _SOURCES[cls] = "\n".join(s for s in stripped if s and not s.startswith("#"))
    return _SOURCES[cls]


def has_llama_rms_norm_forward(module: torch.nn.Module) -> bool:
    """Whether ``module`` normalises with Llama's formula (its ``forward`` is Llama's code)."""
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        return False
    if not isinstance(getattr(module, "variance_epsilon", None), float):
        return False
    reference = _normalised_source(LlamaRMSNorm)
    return reference is not None and _normalised_source(type(module)) == reference


def fused_rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm in two kernels: ``weight * rms_norm(x)`` (``x`` [..., H])."""
    weight, eps = self.weight, self.variance_epsilon
    assert isinstance(weight, torch.Tensor) and isinstance(eps, float)
    normed = F.rms_norm(hidden_states, (weight.shape[-1],), eps=eps)
    return weight * normed


def use_fused_rms_norm(model: torch.nn.Module) -> int:
    """Give every Llama-formula RMSNorm of ``model`` (on a CUDA device) the fused forward;
    the number of modules switched."""
    switched = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.device.type != "cuda":
            continue
        if has_llama_rms_norm_forward(module):
            # an instance attribute shadows the class's forward for this module only
            module.forward = types.MethodType(fused_rms_norm_forward, module)
            switched += 1
    return switched
