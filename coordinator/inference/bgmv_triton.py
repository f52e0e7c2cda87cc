"""Triton BGMV kernels: example-routed LoRA for one token per row (the decode step), in place.

Same math as :func:`moerge.coordinator.inference.mixing.add_example_mixed_delta_` with ``T = 1``:
row ``b`` of a decode step adds ``sum_j w[b, j] B_{s[b, j]} A_{s[b, j]} x[b]`` to the frozen
layer's output. PyTorch does that in five kernels per adapted module: it gathers every row's
factors into ``[B, k r, d_in]`` and ``[B, k r, d_out]`` copies, runs two batched matmuls of one
row each and the weighting between them. On a decode step of a 1.1B Llama at 32 rows (88
adapted modules) those kernels took about 1.5 ms of a 4.9 ms step on an H100, the gathers alone
0.45 ms, for a delta whose factors are a few megabytes.

Here the rows read their experts' factors where they lie in the bank (Punica's BGMV, "batched
gather matrix-vector", Chen et al., 2023, https://arxiv.org/abs/2310.18547), in two kernels::

    shrink   z[b, j, s] = w[b, j] * (A[s[b, j], :, s-block] @ x[b, s-block])   [B, k, S, R]
    expand   out[b] += sum_j (sum_s z[b, j, s]) @ B^T[s[b, j]]                  [B, d_out]

``R`` is the bank's rank padded to a power of two (rows past ``r`` read as zero). The shrink
runs one program per (row, expert, block of ``BLOCK_K`` inputs): split over ``d_in``, so a
decode step of 32 rows has 256 programs for a 2,048-wide layer to spread over the GPU's 132
SMs. One program per (row, expert) streaming all of ``d_in`` left most SMs idle and took 14.9
us a call, a third of the decode step's GPU time (H100, ``benchmarks/decode_profile.py --bgmv``).
The expand, one program per (row, block of ``d_out``), adds the ``S`` partial sums (a few
hundred bytes) before its product, so each output is written once, by one program, without
atomics, and the result does not depend on the order programs run in.
``z`` stays in float32 (the PyTorch path rounds it to the bank's dtype twice), so results agree
with it to the bank dtype's rounding, not bit for bit. Slots must already be cleaned (no
``-1``: :func:`~.mixing.clean_example_decision` maps them to slot 0 with weight 0). Nothing
reads back to the host, so a CUDA graph can hold both kernels.
"""

from __future__ import annotations

import torch

from moerge.triton_support import KERNEL_ERRORS, available, tl, triton

__all__ = ["KERNEL_ERRORS", "available", "bgmv_add_"]

BLOCK_K = 256  # d_in per shrink program
BLOCK_N = 128  # d_out per program of the expand


if triton is not None:

    @triton.jit
    def _shrink_kernel(
        x_ptr,
        a_ptr,
        slots_ptr,
        weights_ptr,
        z_ptr,
        k,
        d_in,
        r,
        stride_xb,
        stride_ae,
        stride_ar,
        R: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Program (b, j, s): ``z[b, j, s, :] = w[b, j] * A[s[b, j], :r, s-block] @ x[b, s-block]``
        in float32, one block of ``d_in`` per program (the expand sums the blocks)."""
        row = tl.program_id(0)
        j = tl.program_id(1)
        split = tl.program_id(2)
        splits = tl.num_programs(2)
        slot = tl.load(slots_ptr + row * k + j).to(tl.int64)
        weight = tl.load(weights_ptr + row * k + j).to(tl.float32)
        ranks = tl.arange(0, R)
        cols = split * BLOCK + tl.arange(0, BLOCK)
        in_cols = cols < d_in
        xv = tl.load(x_ptr + row * stride_xb + cols, mask=in_cols, other=0.0).to(tl.float32)
        a = tl.load(
            a_ptr + slot * stride_ae + ranks[:, None] * stride_ar + cols[None, :],
            mask=(ranks[:, None] < r) & in_cols[None, :],
            other=0.0,
        ).to(tl.float32)  # [R, BLOCK]
        partial = tl.sum(a * xv[None, :], axis=1)
        tl.store(z_ptr + ((row * k + j) * splits + split) * R + ranks, partial * weight)

    @triton.jit
    def _expand_add_kernel(
        out_ptr,
        z_ptr,
        bt_ptr,
        slots_ptr,
        k,
        splits,
        d_out,
        r,
        stride_ob,
        stride_be,
        stride_br,
        R: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Program (b, n): ``out[b, n-block] += sum_j (sum_s z[b, j, s]) @ B^T[s[b, j], :r,
        n-block]``."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_cols = cols < d_out
        ranks = tl.arange(0, R)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(k):
            slot = tl.load(slots_ptr + row * k + j).to(tl.int64)
            z = tl.zeros((R,), dtype=tl.float32)
            for split in range(splits):  # the shrink's blocks of d_in
                z += tl.load(z_ptr + ((row * k + j) * splits + split) * R + ranks)  # [R]
            bt = tl.load(
                bt_ptr + slot * stride_be + ranks[:, None] * stride_br + cols[None, :],
                mask=(ranks[:, None] < r) & in_cols[None, :],
                other=0.0,
            ).to(tl.float32)  # [R, BLOCK]
            acc += tl.sum(z[:, None] * bt, axis=0)
        out = tl.load(out_ptr + row * stride_ob + cols, mask=in_cols, other=0.0).to(tl.float32)
        tl.store(
            out_ptr + row * stride_ob + cols,
            (out + acc).to(out_ptr.dtype.element_ty),
            mask=in_cols,
        )


def bgmv_add_(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    Bt: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """``out[b] += sum_j weights[b, j] * Bt[slots[b, j]]^T @ A[slots[b, j]] @ x[b]``, in place.

    Args:
        out: [B, d_out] the layer's output (last dimension contiguous).
        x: [B, d_in] its input, one token per row (last dimension contiguous).
        A: [E, r, d_in] bank of down-projections (last dimension contiguous).
        Bt: [E, r, d_out] bank of transposed up-projections, scaling folded in (last
            dimension contiguous: the bank's own layout).
        slots: [B, k] long, cleaned (every entry a slot of the bank).
        weights: [B, k] mixing weights (any float dtype; read in float32).

    Returns:
        ``out``.
    """
    rows, d_out = out.shape
    _, r, d_in = A.shape
    k = slots.shape[1]
    if rows == 0 or k == 0:
        return out
    for name, t in (("out", out), ("x", x), ("A", A), ("Bt", Bt)):
        if t.stride(-1) != 1:
            raise ValueError(f"bgmv_add_: {name}'s last dimension must be contiguous")
    R = max(16, triton.next_power_of_2(r))
    # contiguous already (no copy): a dtype conversion here was a kernel per module, 88 a step
    slots, weights = slots.contiguous(), weights.contiguous()  # the shrink reads in float32
    splits = triton.cdiv(d_in, BLOCK_K)
    z = torch.empty(rows, k, splits, R, device=x.device, dtype=torch.float32)  # [B, k, S, R]
    _shrink_kernel[(rows, k, splits)](
        x,
        A,
        slots,
        weights,
        z,
        k,
        d_in,
        r,
        x.stride(0),
        A.stride(0),
        A.stride(1),
        R=R,
        BLOCK=BLOCK_K,
    )
    _expand_add_kernel[(rows, triton.cdiv(d_out, BLOCK_N))](
        out,
        z,
        Bt,
        slots,
        k,
        splits,
        d_out,
        r,
        out.stride(0),
        Bt.stride(0),
        Bt.stride(1),
        R=R,
        BLOCK=BLOCK_N,
    )
    return out
