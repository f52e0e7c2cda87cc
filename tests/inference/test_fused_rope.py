"""The fused rotary swap: which modeling modules it takes, and that it keeps transformers'
result (CUDA with Liger-Kernel for the kernel itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2

from moerge.coordinator.inference.generation import fused_rope
from moerge.coordinator.inference.generation.fused_rope import (
    fused_or_original,
    fused_rotary_available,
    has_llama_rotary,
    rows_folded,
    use_fused_rotary,
)
from tests.tiny_models import make_tiny_llama


def rotary_inputs(device: str = "cpu", dtype: torch.dtype = torch.float32, length: int = 1):
    """q, k, cos, sin of 3 rows of ``length`` tokens (1: a decode step), 8 query heads and 2
    key heads of 16 dimensions, in the projections' layout (views of [R, T, H, D])."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, length, 8, 16, generator=generator).transpose(1, 2)  # [R, H_q, T, D]
    k = torch.randn(3, length, 2, 16, generator=generator).transpose(1, 2)  # [R, H_kv, T, D]
    angles = torch.rand(3, length, 8, generator=generator) * 6.28
    cos = torch.cat([angles.cos()] * 2, dim=-1)  # [R, T, D]
    sin = torch.cat([angles.sin()] * 2, dim=-1)
    return [t.to(device, dtype) for t in (q, k, cos, sin)]


def test_llama_formula_rotary_is_recognised_and_neoxs_partial_one_is_not() -> None:
    assert has_llama_rotary(modeling_llama)
    assert has_llama_rotary(modeling_qwen2)  # generated from Llama's code
    assert not has_llama_rotary(modeling_gpt_neox)  # rotates only part of each head


def test_tensors_off_cuda_keep_transformers_rotary() -> None:
    def fused(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise AssertionError("the fused kernel is for CUDA tensors only")

    rotary = fused_or_original(modeling_llama.apply_rotary_pos_emb, fused)
    q, k, cos, sin = rotary_inputs()
    for got, want in zip(
        rotary(q, k, cos, sin), modeling_llama.apply_rotary_pos_emb(q, k, cos, sin), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("length", [1, 5], ids=["decode", "prefill"])
@pytest.mark.parametrize("shared_cos", [False, True], ids=["cos-per-row", "cos-shared"])
def test_rows_fold_into_one_sequence_and_keep_each_rows_rotation(
    shared_cos: bool, length: int
) -> None:
    """Liger compiles a kernel per batch size: the fused function must only ever see a batch
    of one, and the rows must come back rotated by their own positions."""
    q, k, cos, sin = rotary_inputs(length=length)
    if shared_cos:  # every row at the same positions (a prefill without per-row offsets)
        cos, sin = cos[:1], sin[:1]
    seen = []

    def fused(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append([tuple(a.shape) for a in args])
        return modeling_llama.apply_rotary_pos_emb(*args)

    got = rows_folded(fused)(q, k, cos, sin)
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    rows, _, _, dim = q.shape
    tokens = rows * length
    assert seen == [
        [
            (1, q.shape[1], tokens, dim),
            (1, k.shape[1], tokens, dim),
            (1, tokens, dim),
            (1, tokens, dim),
        ]
    ]


def test_cpu_models_leave_the_modeling_module_alone(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "llama"))
    original = modeling_llama.apply_rotary_pos_emb
    assert use_fused_rotary(model) is False
    assert modeling_llama.apply_rotary_pos_emb is original


@pytest.mark.skipif(not fused_rotary_available(), reason="needs CUDA and Liger-Kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_gives_transformers_result(dtype: torch.dtype) -> None:
    q, k, cos, sin = rotary_inputs("cuda", dtype)
    original = (
        getattr(modeling_llama, fused_rope._MARK, None) or modeling_llama.apply_rotary_pos_emb
    )
    want = original(q, k, cos, sin)
    exact = original(*(t.double() for t in (q, k, cos, sin)))  # the same inputs, no rounding
    rotary = fused_or_original(original, fused_rope._liger_rotary())
    got = rotary(q.clone(), k.clone(), cos, sin)
    for g, w, e, x in zip(got, want, exact, (q, k), strict=True):
        assert g.shape == w.shape
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            continue
        # Half precision: the kernel rounds once, transformers after each of its operations,
        # so they need not agree bit for bit (measured on an H100: 7 of 384 values one bf16
        # step apart). Both must be within a few roundings of the exact rotation.
        bound = 4 * torch.finfo(dtype).eps * x.abs().max().double()
        assert (g.double() - e).abs().max() <= bound
        assert (w.double() - e).abs().max() <= bound


@pytest.mark.skipif(not fused_rotary_available(), reason="needs CUDA and Liger-Kernel")
def test_cuda_model_takes_the_fused_rotary_and_its_logits_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # restored after the test: the swap is process-wide for the modeling module, and an
    # earlier test in this process may have made it already
    original = (
        getattr(modeling_llama, fused_rope._MARK, None) or modeling_llama.apply_rotary_pos_emb
    )
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)
    monkeypatch.setattr(modeling_llama, fused_rope._MARK, None, raising=False)
    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "llama"))
    model = model.to("cuda").eval()
    ids = torch.randint(3, model.config.vocab_size, (4, 12), device="cuda")
    with torch.no_grad():
        before = model(ids).logits
        assert use_fused_rotary(model)
        after = model(ids).logits
    assert getattr(modeling_llama, fused_rope._MARK) is not None
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
