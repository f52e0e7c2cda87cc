"""The BGMV kernels of the decode step against PyTorch's gathered path (CUDA with Triton)."""

from __future__ import annotations

import pytest
import torch

from moerge.coordinator.inference import bgmv_triton, mixing
from moerge.coordinator.inference.mixing import add_example_mixed_delta_, clean_example_decision

pytestmark = pytest.mark.skipif(
    not bgmv_triton.available(), reason="needs a CUDA device and Triton"
)

SHAPES = [  # E, r, d_in, d_out, rows, k
    (8, 16, 2048, 2048, 32, 1),
    (8, 16, 2048, 256, 32, 2),
    (6, 8, 200, 300, 5, 3),  # rank below the padded 16, widths not multiples of the blocks
    (4, 16, 8192, 512, 3, 2),  # an MLP down-projection's width: 32 blocks of d_in summed
]


def _case(
    shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    E, r, d_in, d_out, rows, k = shape
    g = torch.Generator().manual_seed(0)
    A = torch.randn(E, r, d_in, generator=g).to("cuda", dtype)
    Bt = (0.1 * torch.randn(E, r, d_out, generator=g)).to("cuda", dtype)
    x = torch.randn(rows, d_in, generator=g).to("cuda", dtype)
    out = torch.randn(rows, d_out, generator=g).to("cuda", dtype)
    slots = torch.randint(-1, E, (rows, k), generator=g).cuda()
    slots, weights = clean_example_decision(slots, torch.rand(rows, k, generator=g).cuda(), dtype)
    return out, x, A, Bt, slots, weights


def _exact(out, x, A, Bt, slots, weights) -> torch.Tensor:
    """float64 ``out + sum_j w_j Bt[s_j]^T A[s_j] x`` per row."""
    z = torch.einsum("bjri,bi->bjr", A.double()[slots], x.double())  # [rows, k, r]
    delta = torch.einsum("bj,bjr,bjro->bo", weights.double(), z, Bt.double()[slots])
    return out.double() + delta


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_kernels_give_the_exact_delta(shape: tuple[int, ...]) -> None:
    out, x, A, Bt, slots, weights = _case(shape, torch.float32)
    expected = _exact(out, x, A, Bt, slots, weights)
    got = bgmv_triton.bgmv_add_(out.clone(), x, A, Bt, slots, weights)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_kernels_are_as_close_to_exact_as_the_gathered_path(
    shape: tuple[int, ...],
) -> None:
    out, x, A, Bt, slots, weights = _case(shape, torch.bfloat16)
    expected = _exact(out, x, A, Bt, slots, weights)
    rows, d_in, d_out = x.shape[0], x.shape[1], out.shape[1]
    gathered = out.clone().view(rows, 1, d_out)
    add_example_mixed_delta_(gathered, x.view(rows, 1, d_in), A, Bt.transpose(1, 2), slots, weights)
    got = bgmv_triton.bgmv_add_(out.clone(), x, A, Bt, slots, weights)
    error = (got.double() - expected).abs().max()
    reference_error = (gathered.view(rows, d_out).double() - expected).abs().max()
    assert error <= reference_error * 1.01 + 1e-6  # z in float32, one rounding


def test_serving_path_uses_the_kernels_when_asked_for_one_token_per_row() -> None:
    out, x, A, Bt, slots, weights = _case(SHAPES[0], torch.bfloat16)
    rows, d_in, d_out = x.shape[0], x.shape[1], out.shape[1]
    direct = bgmv_triton.bgmv_add_(out.clone(), x, A, Bt, slots, weights)
    served = out.clone().view(rows, 1, d_out)
    add_example_mixed_delta_(
        served, x.view(rows, 1, d_in), A, Bt.transpose(1, 2), slots, weights, kernels=True
    )
    assert not mixing._BGMV_BROKEN
    torch.testing.assert_close(served.view(rows, d_out), direct, rtol=0, atol=0)
