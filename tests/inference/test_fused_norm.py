"""The fused RMSNorm swap: which norms it takes, and that it computes transformers' result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from moerge.coordinator.inference.generation import fused_norm
from moerge.coordinator.inference.generation.fused_norm import (
    fused_rms_norm_forward,
    has_llama_rms_norm_forward,
    use_fused_rms_norm,
)
from tests.inference.triton_device import triton_device
from tests.tiny_models import make_tiny_llama


def test_llama_formula_norms_are_recognised_and_gemmas_is_not() -> None:
    assert has_llama_rms_norm_forward(LlamaRMSNorm(16))
    assert has_llama_rms_norm_forward(Qwen2RMSNorm(16))
    assert not has_llama_rms_norm_forward(GemmaRMSNorm(16))  # weight enters as 1 + weight
    assert not has_llama_rms_norm_forward(torch.nn.LayerNorm(16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_gives_transformers_result(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight)
    x = (5 * torch.randn(4, 3, 64)).to(dtype)
    torch.testing.assert_close(fused_rms_norm_forward(norm, x), norm(x), rtol=0, atol=0)


def test_cpu_models_keep_transformers_norm(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "llama"))
    assert use_fused_rms_norm(model) == 0  # the fused kernel is CUDA's; CPU keeps the original


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_norms_switch_and_logits_stay(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "llama"))
    model = model.to("cuda", torch.bfloat16).eval()
    ids = torch.randint(3, model.config.vocab_size, (4, 12), device="cuda")
    with torch.no_grad():
        before = model(ids).logits
        switched = use_fused_rms_norm(model)
        after = model(ids).logits
    assert switched == 2 * model.config.num_hidden_layers + 1
    torch.testing.assert_close(after, before, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(triton_device() is None, reason="needs Triton (CUDA or its interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 3, 64), (32, 2048), (5, 1, 200)])  # 200: not a power of 2
def test_triton_kernel_rounds_as_the_two_kernel_path(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    device = triton_device()
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter truncates float32 to bfloat16 instead of rounding")
    torch.manual_seed(0)
    norm = LlamaRMSNorm(shape[-1], eps=1e-5).to(device, dtype)
    torch.nn.init.normal_(norm.weight)
    x = (5 * torch.randn(shape)).to(device, dtype)
    got = fused_norm.triton_rms_norm(x, norm.weight, norm.variance_epsilon)
    expected = norm(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    # the same two roundings; only the float32 sum's order (and the GPU's sqrt) differ, which
    # can move the normalised value by one step of the half-precision format, and that step
    # times the weight by up to two steps of the result; rarely
    step = torch.finfo(dtype).eps * expected.abs().float().clamp_min(1e-3)
    assert ((got.float() - expected.float()).abs() <= 2 * step + 1e-6).all()
    same = (got == expected).float().mean().item()
    print(f"{same:.4f} of the values equal")
    assert same > 0.9
