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

With Triton (the ``gpu`` extra), a half-precision norm whose weight has the input's dtype runs
as one kernel of this module instead of those two: each row's statistics in float32, the
normalised row rounded to the input's dtype, then multiplied by the weight in float32 and
rounded again, the two roundings PyTorch's ``weight * normed`` makes, so the results are the
two-kernel path's (up to the order of the float32 sum and the GPU's ``rsqrt``). In the decode
step's profile the weight's multiply was about 0.15 ms of 3.6 ms (45 kernels of ~3 us each,
H100, 1.1B Llama at 32 rows); a kernel that fails to build falls back to the two kernels with a
warning (:func:`moerge.triton_support.run_or_fall_back`).
"""

from __future__ import annotations

import inspect
import textwrap
import types

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from moerge.triton_support import run_or_fall_back, tl, triton

__all__ = ["fused_rms_norm_forward", "triton_rms_norm", "use_fused_rms_norm"]

#: set to False to keep the two-kernel path (benchmarks compare the two)
TRITON_KERNEL = True
_BROKEN: list[str] = []  # the kernel's build or launch error, once it failed
_HALF = (torch.bfloat16, torch.float16)

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n, eps, BLOCK: tl.constexpr):
        """One program per row: ``out = w * (x * rsqrt(mean(x^2) + eps)).to(dtype)``."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        inverse = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        # transformers rounds twice: the normalised row, then its product with the weight
        normed = (x * inverse).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = w * normed.to(tl.float32)
        y = y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(out_ptr + row * stride_out + cols, y, mask=mask)


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm of ``x`` [..., H] with ``weight`` [H] in one Triton kernel (same dtype,
    last dimension contiguous); a new tensor of ``x``'s shape."""
    H = x.shape[-1]
    rows = x.reshape(-1, H)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows,
            weight,
            out,
            rows.stride(0),
            out.stride(0),
            H,
            eps,
            BLOCK=triton.next_power_of_2(H),
        )
    return out.view(x.shape)


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        TRITON_KERNEL
        and triton is not None
        and not _BROKEN
        and x.dtype in _HALF
        and weight.dtype == x.dtype
        and x.is_cuda
        and x.stride(-1) == 1
        and weight.is_contiguous()
    )


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
    """Llama's RMSNorm in one Triton kernel where it applies, else in two kernels:
    ``weight * rms_norm(x)`` (``x`` [..., H])."""
    weight, eps = self.weight, self.variance_epsilon
    assert isinstance(weight, torch.Tensor) and isinstance(eps, float)
    if _kernel_applies(hidden_states, weight):
        fused = run_or_fall_back(
            lambda: triton_rms_norm(hidden_states, weight, eps),
            _BROKEN,
            "RMSNorm kernel",
            "PyTorch's rms_norm and a multiply",
        )
        if fused is not None:
            return fused
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
