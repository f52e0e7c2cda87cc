"""The Triton top-k + softmax kernel against ``torch.topk`` (CUDA with Triton only)."""

from __future__ import annotations

import pytest
import torch

from moerge.router_training import topk_triton
from moerge.router_training.base import top_k_softmax

pytestmark = pytest.mark.skipif(
    not topk_triton.available(), reason="needs a CUDA device and Triton"
)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("E", [4, 64, 1024, 1030])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("absolute", [False, True])
def test_kernel_keeps_the_k_best_scores_and_their_softmax(k, E, dtype, absolute):
    generator = torch.Generator().manual_seed(E + k)
    scores = torch.randn(333, E, generator=generator).to(dtype)
    members = torch.randperm(5000, generator=generator)[:E]
    indices, weights = topk_triton.top_k_softmax_rows(
        scores.cuda(), k, 0.5, absolute=absolute, members=members.cuda()
    )
    ranked = (scores.abs() if absolute else scores).float()
    values, local = torch.topk(ranked, k)
    # the kept columns have the top-k values (bf16 ties may pick another column of equal value)
    column_of = {int(m): c for c, m in enumerate(members)}
    kept = torch.tensor([[column_of[int(i)] for i in row] for row in indices.cpu()])
    torch.testing.assert_close(torch.gather(ranked, 1, kept), values, rtol=0, atol=0)
    if dtype == torch.float32:  # no ties: the same experts as torch.topk
        torch.testing.assert_close(indices.cpu(), members[local])
    expected = torch.softmax(values / 0.5, dim=-1).to(dtype)
    assert weights.dtype == dtype
    torch.testing.assert_close(weights.cpu(), expected, rtol=1e-2, atol=1e-3)


def test_kernel_breaks_ties_towards_the_lower_expert():
    scores = torch.zeros(5, 300, device="cuda")
    scores[:, [7, 150, 299]] = 1.0
    indices, weights = topk_triton.top_k_softmax_rows(scores, 2)
    assert indices.tolist() == [[7, 150]] * 5
    torch.testing.assert_close(weights, torch.full((5, 2), 0.5, device="cuda"))


def test_kernel_refuses_k_above_its_register_budget():
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        topk_triton.top_k_softmax_rows(torch.zeros(3, 10, device="cuda"), 5)


def test_top_k_softmax_on_cuda_equals_the_cpu_path():
    scores = torch.randn(200, 700, generator=torch.Generator().manual_seed(0))
    cpu = top_k_softmax(scores, 3, 2.0)
    gpu = top_k_softmax(scores.cuda(), 3, 2.0)
    torch.testing.assert_close(gpu.indices.cpu(), cpu.indices)
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=1e-5, atol=1e-6)
