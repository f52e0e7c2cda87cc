"""Triton SGMV kernel: token-level LoRA mixing on CUDA in one fused pass.

Same math as :func:`moerge.coordinator.inference.mixing.token_mixed_delta`. The ``P = N k``
(token, expert) pairs, sorted by slot, are cut into tiles of ``BLOCK_M`` pairs of one expert
(the "align to block size" step of fused MoE kernels), and each program does, for its tile::

    shrink   z = w * (x[tokens] @ A_e^T)                   [BLOCK_M, r]      fp32 accumulate
    expand   delta[tokens] += z @ B_e^T                    [BLOCK_M, d_out]  fp32 atomics

gathering the token rows of ``x`` itself and scatter-adding into the token rows of the
output, so neither the gathered activations ``[P, d_in]``, nor ``z``, nor the per-pair
outputs ``[P, d_out]`` are ever written to memory (the grouped-GEMM path in :mod:`.mixing`
writes and re-reads them). Each tile reads its expert's factors once: the bank is read at most
``ceil(P / BLOCK_M) + E_used`` times per module, never per token.

Host overhead dominates at serving sizes (each launch costs more host time than the kernel
takes), so the whole path is five launches and needs no host sync (a routed forward pass can
be captured in a CUDA graph): ``sort`` of the slots, ``searchsorted`` for each segment's row
end, a one-program Triton scan for the cumulative tile counts, the zeroed output and the
fused kernel, whose programs find their segment by binary search over the tile counts. The
grid has a static bound of ``ceil(P / BLOCK_M) + min(E + 1, P)`` tiles; programs past the
last tile exit at once. Pairs with slot ``-1`` form segment 0 and are skipped.

With ``k <= 2`` the atomic sums are exact whatever their order (``0 + a + b`` is commutative
in floating point), so results are deterministic; with ``k > 2`` the fp32 sums may differ in
their last bits between runs.

This follows Punica's SGMV (Chen et al., 2023, https://arxiv.org/abs/2310.18547) and vLLM's
LoRA shrink/expand kernels. Only half precision (bf16, fp16) takes this path; Triton is
imported lazily, and :func:`available` says whether it can run here.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton is optional: CPU-only installs do not have it.
    import triton
    import triton.language as tl
    from triton.compiler.errors import CompilationError

    #: what a kernel that cannot be built or launched here raises
    KERNEL_ERRORS: tuple[type[Exception], ...] = (CompilationError, RuntimeError)
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None
    KERNEL_ERRORS = (RuntimeError,)

__all__ = ["available", "segment_ends", "sgmv_token_delta"]

BLOCK_K = 64  # d_in per step of the shrink loop
BLOCK_N = 128  # d_out per step of the expand loop


@functools.cache
def available() -> bool:
    """Whether Triton and a CUDA device are present."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _tile_ends_kernel(ends_ptr, tile_end_ptr, NSEG, BLOCK_M: tl.constexpr,
                          BLOCK_S: tl.constexpr):
        """One program: ``tile_end[s] = sum_{s' <= s} ceil(count[s'] / BLOCK_M)``."""
        carry = tl.zeros((BLOCK_S,), dtype=tl.int64)  # running total (every lane equal)
        for s0 in range(0, NSEG, BLOCK_S):
            seg = s0 + tl.arange(0, BLOCK_S)
            mask = seg < NSEG
            end = tl.load(ends_ptr + seg, mask=mask, other=0)
            start = tl.load(ends_ptr + seg - 1, mask=mask & (seg > 0), other=0)
            tiles = tl.where(mask, (end - start + BLOCK_M - 1) // BLOCK_M, 0)
            tl.store(tile_end_ptr + seg, tl.cumsum(tiles, 0) + carry, mask=mask)
            carry = carry + tl.sum(tiles, 0)

    @triton.jit
    def _sgmv_kernel(
        x_ptr, a_ptr, bt_ptr, out_ptr, order_ptr, weight_ptr, ends_ptr, tile_end_ptr,
        NSEG, k, d_in, d_out, r,
        stride_xn, stride_ae, stride_ar, stride_ak, stride_be, stride_br, stride_bn, stride_on,
        LOG_NSEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        tile = tl.program_id(0)
        # segment of this tile: the first s with tile_end[s] > tile (binary search)
        lo = tile * 0
        hi = lo + NSEG
        for _ in tl.static_range(LOG_NSEG):
            mid = (lo + hi) // 2
            above = tl.load(tile_end_ptr + mid, mask=mid < NSEG, other=0) > tile
            hi = tl.where(above & (lo < hi), mid, hi)
            lo = tl.where(above | (lo >= hi), lo, mid + 1)
        # segment 0 holds the pairs without an expert (slot -1); past the last tile: nothing
        if (lo >= NSEG) | (lo == 0):
            return
        seg = lo
        end = tl.load(ends_ptr + seg)
        begin = tl.load(ends_ptr + seg - 1)
        first_tile = tl.load(tile_end_ptr + seg) - (end - begin + BLOCK_M - 1) // BLOCK_M
        rows = begin + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)  # sorted positions
        row_mask = rows < end
        pair = tl.load(order_ptr + rows, mask=row_mask, other=0)  # [BM] pair = token * k + j
        token = pair // k
        expert = (seg - 1).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < r

        # shrink: z = w * (x_token @ A_e^T)                                       [BM, BR]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < d_in
            x_tile = tl.load(  # [BM, BK] gathered token rows
                x_ptr + token[:, None] * stride_xn + offs_k[None, :],
                mask=row_mask[:, None] & k_mask[None, :], other=0.0,
            )
            a_tile = tl.load(  # [BK, BR] = A_e^T block
                a_ptr + expert * stride_ae + offs_r[None, :] * stride_ar
                + offs_k[:, None] * stride_ak,
                mask=k_mask[:, None] & r_mask[None, :], other=0.0,
            )
            acc += tl.dot(x_tile, a_tile)
        w = tl.load(weight_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)  # [BM]
        z = (acc * w[:, None]).to(bt_ptr.dtype.element_ty)

        # expand: out[token] += z @ B_e^T, one block of d_out at a time           [BM, BN]
        for n0 in range(0, d_out, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < d_out
            b_tile = tl.load(  # [BR, BN] = B_e^T block
                bt_ptr + expert * stride_be + offs_r[:, None] * stride_br
                + offs_n[None, :] * stride_bn,
                mask=r_mask[:, None] & n_mask[None, :], other=0.0,
            )
            tl.atomic_add(
                out_ptr + token[:, None] * stride_on + offs_n[None, :], tl.dot(z, b_tile),
                mask=row_mask[:, None] & n_mask[None, :], sem="relaxed",
            )


@functools.cache
def _segment_ids(first: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(first, first + n, device=device)


def segment_ends(sorted_ids: torch.Tensor, n: int, first: int = 0) -> torch.Tensor:
    """Exclusive end of the run of each id ``first .. first + n - 1`` in ``sorted_ids`` [P]:
    [n] int64.

    ``searchsorted`` rather than ``bincount``: CUDA's ``bincount`` reads the maximum back to
    the host, this does not.
    """
    return torch.searchsorted(sorted_ids, _segment_ids(first, n, sorted_ids.device), right=True)


def sgmv_token_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int = BLOCK_K,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Token-level mixing with the Triton kernels (CUDA, bf16/fp16).

    Args:
        x: [N, d_in]; A: [E, r, d_in]; B: [E, d_out, r] (any strides; the bank's is a view of a
            contiguous [E, r, d_out]); slots: [N, k] long, ``-1`` for "no expert" (skipped, its
            weight is never read); weights: [N, k].

        block_m, block_n, block_k, num_warps, num_stages: tile sizes and launch settings.
            Defaults from a sweep on an H100 (N = 16384, d_in = 2048, r = 16, top-2, E = 64
            and 1024; 108 settings): ``block_m`` 32 for many small segments, else 64;
            ``block_n`` 64 and 2 stages for d_out >= 1024 (0.36 ms against 0.40 ms with 128
            and 3 at d_out = 2048, E = 64), else 128 and 3. No setting was more than 10%
            faster than these at any of the four shapes.

    Returns:
        [N, d_out] float32 delta.
    """
    E, r, d_in = A.shape
    d_out = B.shape[1]
    N, k = slots.shape
    P = N * k
    x = x.contiguous()
    B_t = B.transpose(1, 2)  # [E, r, d_out]
    block_r = max(16, triton.next_power_of_2(r))
    wide = d_out >= 1024
    block_n = block_n or (64 if wide else BLOCK_N)
    num_stages = num_stages or (2 if wide else 3)
    if block_m is None:
        block_m = 32 if P < 64 * E else 64  # many small segments: smaller tiles waste less
    nseg = E + 1  # segment 0: slot -1 (no expert); segment 1 + s: slot s
    sorted_slot, order = torch.sort(slots.reshape(-1))  # [P], [P] (order = token * k + j)
    ends = segment_ends(sorted_slot, nseg, first=-1)  # [E + 1] exclusive row ends
    tile_end = torch.empty_like(ends)  # [E + 1] cumulative tile counts
    _tile_ends_kernel[(1,)](ends, tile_end, nseg, BLOCK_M=block_m, BLOCK_S=1024)
    bound = -(-P // block_m) + min(nseg, P)  # static bound on the number of tiles
    out = torch.zeros(N, d_out, dtype=torch.float32, device=x.device)  # [N, d_out]
    _sgmv_kernel[(bound,)](
        x, A, B_t, out, order, weights.reshape(-1), ends, tile_end, nseg, k, d_in, d_out, r,
        x.stride(0), A.stride(0), A.stride(1), A.stride(2),
        B_t.stride(0), B_t.stride(1), B_t.stride(2), out.stride(0),
        LOG_NSEG=nseg.bit_length(), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
        BLOCK_R=block_r, num_warps=num_warps, num_stages=num_stages,
    )
    return out
