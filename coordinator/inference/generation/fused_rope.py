"""Rotary position embeddings in one kernel per layer for the decode step on a GPU.

Llama-style attention rotates the query and key of every token by its position::

    q' = q * cos + rotate_half(q) * sin        rotate_half([x1, x2]) = [-x2, x1]
    k' = k * cos + rotate_half(k) * sin        q [R, H_q, T, D], k [R, H_kv, T, D]

transformers writes this as about a dozen tensor operations per layer (two ``unsqueeze``, the
slices, ``neg`` and ``cat`` of ``rotate_half`` twice, four ``mul``, two ``add``). In a decode
step of a 1.1B model at 32 rows each is a kernel of a few microseconds on a tiny tensor: about
220 kernels per step (counted with the profiler, docs/inference.md), a cost set by the number
of kernels, not the bytes, as for the norms (:mod:`.fused_norm`).

Liger-Kernel (LinkedIn's Triton kernels for transformers models; the optional ``gpu`` extra)
rotates query and key in place in one kernel. transformers calls ``apply_rotary_pos_emb`` as a
global of the model's modeling module, so :func:`use_fused_rotary` replaces that global for
modules whose function is Llama's (found by comparing the source, as :mod:`.fused_norm`
does), as Liger's own ``apply_liger_kernel_to_llama`` does. The replacement is process-wide for
that module, so it keeps transformers' function for anything not on CUDA (a CPU engine in the
same process, say) and for layouts Liger does not take.

The scheduler swaps it in when ``generation_fused_rotary`` is on (the default; it does nothing
without CUDA and Liger-Kernel). On an H100 (2026-12-07) its CUDA tests pass, and with the BGMV
kernels it took the server's decode step of a 1.1B Llama at 32 streams from 5.29 to 3.76 ms
(``benchmarks/generation_throughput.py --fused-rotary --bgmv``).
"""

from __future__ import annotations

import importlib
import inspect
import textwrap
from collections.abc import Callable
from types import ModuleType

import torch
from transformers.models.llama import modeling_llama

__all__ = ["fused_rotary_available", "use_fused_rotary"]

Rotary = Callable[..., tuple[torch.Tensor, torch.Tensor]]

#: the attribute marking a modeling module whose ``apply_rotary_pos_emb`` was replaced
_MARK = "_moerge_fused_rotary"


def _liger_rotary() -> Rotary | None:
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:  # the optional gpu extra is not installed (or Triton is missing)
        return None
    return liger_rotary_pos_emb


def fused_rotary_available() -> bool:
    """Whether the fused kernel can run here (Liger-Kernel importable and a CUDA device)."""
    return torch.cuda.is_available() and _liger_rotary() is not None


def _plain_function(rotary: object) -> Callable[..., object] | None:
    """The Python function behind ``rotary``: itself, the function a decorator wraps, or,
    where the ``kernels`` package is installed (transformers then turns the function into a
    module, ``use_kernel_forward_from_hub``), the function its ``forward`` closes over."""
    if inspect.isfunction(rotary):
        return inspect.unwrap(rotary)
    forward = getattr(type(rotary), "forward", None)
    for cell in getattr(forward, "__closure__", None) or ():
        inner = cell.cell_contents
        if inspect.isfunction(inner) and inner.__name__ == "apply_rotary_pos_emb":
            return inspect.unwrap(inner)
    return None


def _source(rotary: object) -> str | None:
    """The function's body without decorators, indentation, blank lines and comments."""
    function = _plain_function(rotary)
    if function is None:
        return None
    try:
        lines = textwrap.dedent(inspect.getsource(function)).splitlines()
    except (OSError, TypeError):
        return None
    body = (line.strip() for line in lines if not line.strip().startswith("@"))
    return "\n".join(line for line in body if line and not line.startswith("#"))


def has_llama_rotary(module: ModuleType) -> bool:
    """Whether ``module``'s ``apply_rotary_pos_emb`` is Llama's (the same source)."""
    function = getattr(module, _MARK, None) or getattr(module, "apply_rotary_pos_emb", None)
    if function is None:
        return False
    # Llama's own function, also where Llama's module was swapped (the mark keeps it)
    reference = _source(getattr(modeling_llama, _MARK, None) or modeling_llama.apply_rotary_pos_emb)
    return reference is not None and _source(function) == reference


def rows_folded(fused: Rotary) -> Rotary:
    """``fused`` called on one sequence of ``R * T`` tokens instead of ``R`` rows of ``T``.

    Liger's kernel takes the batch size and cos's batch size as compile-time constants
    (``tl.constexpr``), so every new number of rows would build a kernel of its own, a few
    hundred milliseconds of Triton compilation inside a request: each prefill of a new number
    of admitted requests, each routing-embedding pass, each eagerly run decode step of a new
    number of rows. Folded, the rows are one sequence of a batch of one, and one kernel serves
    every shape (the token count is an ordinary argument). Rows keep their own positions: cos
    and sin are laid out per token, ``[1, R * T, D]``. The reshapes are views of the
    projections' ``[R, T, H, D]`` layout; only a cos shared by every row ([1, T, D]) is copied
    out per row, ``R * T * D`` values.
    """

    def apply_rotary_pos_emb(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [R, H_q, T, D], k [R, H_kv, T, D], cos and sin [R or 1, T, D]."""
        rows, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        tokens = rows * length
        cos = cos.expand(rows, -1, -1).reshape(1, tokens, cos.shape[-1])
        sin = sin.expand(rows, -1, -1).reshape(1, tokens, sin.shape[-1])
        q_folded = q.transpose(1, 2).reshape(1, tokens, heads, dim).transpose(1, 2)
        k_folded = k.transpose(1, 2).reshape(1, tokens, kv_heads, dim).transpose(1, 2)
        q_out, k_out = fused(q_folded, k_folded, cos, sin)
        return (
            q_out.transpose(1, 2).reshape(rows, length, heads, dim).transpose(1, 2),
            k_out.transpose(1, 2).reshape(rows, length, kv_heads, dim).transpose(1, 2),
        )

    return apply_rotary_pos_emb


def fused_or_original(original: Rotary, fused: Rotary) -> Rotary:
    """``fused`` (rows folded: :func:`rows_folded`) for CUDA tensors in transformers' default
    layout, else ``original``."""
    folded = rows_folded(fused)

    def apply_rotary_pos_emb(
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        unsqueeze_dim: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [R, H_q, T, D], k [R, H_kv, T, D], cos and sin [R or 1, T, D]."""
        if q.is_cuda and unsqueeze_dim == 1 and q.dim() == 4 and cos.dim() == 3:
            return folded(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    return apply_rotary_pos_emb


def use_fused_rotary(model: torch.nn.Module) -> bool:
    """Give the modeling module of ``model`` (on CUDA) the fused rotary kernel when its
    ``apply_rotary_pos_emb`` is Llama's; whether it now has it."""
    parameter = next(model.parameters(), None)
    fused = _liger_rotary()
    if parameter is None or parameter.device.type != "cuda" or fused is None:
        return False
    module = importlib.import_module(type(model).__module__)
    if getattr(module, _MARK, None) is not None:
        return True
    if not has_llama_rotary(module):
        return False
    original = module.apply_rotary_pos_emb
    setattr(module, _MARK, original)
    module.apply_rotary_pos_emb = fused_or_original(original, fused)  # type: ignore[attr-defined]
    return True
