"""Triton SGMV kernel: token-level LoRA mixing on CUDA in one fused pass.

Same math as :func:`moerge.coordinator.inference.mixing.token_mixed_delta`. The ``P = N k``
(token, expert) pairs, sorted by slot, are cut into tiles of ``BLOCK_M`` pairs of one expert
(the "align to block size" step of fused MoE kernels), and each program does, for its tile::

    shrink   z = w * (x[tokens] @ A_e^T)                   [BLOCK_M, r]      fp32 accumulate
    expand   y = z @ B_e^T                                 [BLOCK_M, d_out]

gathering the token rows of ``x`` itself, so neither the gathered activations ``[P, d_in]``
nor ``z`` are ever written to memory (the grouped-GEMM path in :mod:`.mixing` writes and
re-reads them). Each tile reads its expert's factors once: the bank is read at most
``ceil(P / BLOCK_M) + E_used`` times per module, never per token. ``y`` goes one of two ways:

* :func:`sgmv_token_add_` (serving) stores each pair's row in a ``[P, d_out]`` buffer in the
  activations' dtype, in pair order (no two programs write one row), and a second kernel adds
  each token's ``k`` rows to the layer's output, summing in float32 and rounding once. No
  atomics, deterministic for any ``k``.
* :func:`sgmv_token_delta` scatter-adds ``y`` into a float32 ``[N, d_out]`` delta with
  atomics. With ``k <= 2`` the sums are exact whatever their order (``0 + a + b`` is
  commutative in floating point); with ``k > 2`` their last bits may differ between runs.
  Measured slower (0.54-0.59 ms against 0.34-0.39 ms per wide module on an H100): the float32
  buffer is zeroed, updated atomically and read again.

Host overhead matters at serving sizes (a launch can cost more host time than its kernel
takes on the device), so the pairs are sorted by a counting sort of three small kernels
(count with atomics, which also gives each pair its rank in its segment; a one-program scan for
segment ends and cumulative tile counts; scatter) instead of ``torch.sort`` +
``searchsorted``, and nothing synchronises with the host (a routed forward pass can be captured
in a CUDA graph). The fused kernel's programs find their segment by binary search over the
tile counts; the grid has a static bound of ``ceil(P / BLOCK_M) + min(E + 1, P)`` tiles and
programs past the last tile exit at once. Pairs with slot ``-1`` form segment 0 and are
skipped; slots outside ``-1 .. E - 1`` are dropped.

This follows Punica's SGMV (Chen et al., 2023, https://arxiv.org/abs/2310.18547) and vLLM's
LoRA shrink/expand kernels. Only half precision (bf16, fp16) takes this path; Triton is
imported lazily, and :func:`available` says whether it can run here.
"""

from __future__ import annotations

import functools

import torch

from moerge.triton_support import KERNEL_ERRORS, available, tl, triton

__all__ = [
    "KERNEL_ERRORS",
    "available",
    "segment_ends",
    "sgmv_token_add_",
    "sgmv_token_delta",
]

BLOCK_K = 64  # d_in per step of the shrink loop
BLOCK_N = 128  # d_out per step of the expand loop
_SORT_BLOCK = 1024  # pairs per program of the counting sort


if triton is not None:

    @triton.jit
    def _count_kernel(slots_ptr, counts_ptr, rank_ptr, P, NSEG, BLOCK: tl.constexpr):
        """Counting sort, step 1: count each pair in its segment ``slot + 1``; the count before
        it is its rank within the segment (``rank`` [P])."""
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seg = tl.load(slots_ptr + p, mask=p < P, other=-2) + 1
        ok = (p < P) & (seg >= 0) & (seg < NSEG)  # a slot out of range is dropped, never written
        rank = tl.atomic_add(counts_ptr + seg, 1, mask=ok, sem="relaxed")
        tl.store(rank_ptr + p, rank, mask=ok)

    @triton.jit
    def _scan_kernel(
        counts_ptr, ends_ptr, tile_end_ptr, NSEG, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr
    ):
        """Step 2, one program: ``ends[s] = sum_{s' <= s} count[s']`` (exclusive row ends) and
        ``tile_end[s] = sum_{s' <= s} ceil(count[s'] / BLOCK_M)``."""
        rows = tl.zeros((BLOCK_S,), dtype=tl.int64)  # running totals (every lane equal)
        tiles = tl.zeros((BLOCK_S,), dtype=tl.int64)
        for s0 in range(0, NSEG, BLOCK_S):
            seg = s0 + tl.arange(0, BLOCK_S)
            mask = seg < NSEG
            count = tl.load(counts_ptr + seg, mask=mask, other=0).to(tl.int64)
            tile = (count + BLOCK_M - 1) // BLOCK_M
            tl.store(ends_ptr + seg, tl.cumsum(count, 0) + rows, mask=mask)
            tl.store(tile_end_ptr + seg, tl.cumsum(tile, 0) + tiles, mask=mask)
            rows = rows + tl.sum(count, 0)
            tiles = tiles + tl.sum(tile, 0)

    @triton.jit
    def _scatter_kernel(
        slots_ptr, rank_ptr, counts_ptr, ends_ptr, order_ptr, P, NSEG, BLOCK: tl.constexpr
    ):
        """Step 3: ``order[start of its segment + rank] = pair``."""
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seg = tl.load(slots_ptr + p, mask=p < P, other=-2) + 1
        ok = (p < P) & (seg >= 0) & (seg < NSEG)
        start = tl.load(ends_ptr + seg, mask=ok, other=0) - tl.load(
            counts_ptr + seg, mask=ok, other=0
        )
        rank = tl.load(rank_ptr + p, mask=ok, other=0)
        tl.store(order_ptr + start + rank, p.to(tl.int64), mask=ok)

    @triton.jit
    def _sgmv_kernel(
        x_ptr,
        a_ptr,
        bt_ptr,
        out_ptr,
        order_ptr,
        weight_ptr,
        ends_ptr,
        tile_end_ptr,
        NSEG,
        k,
        d_in,
        d_out,
        r,
        stride_xn,
        stride_ae,
        stride_ar,
        stride_ak,
        stride_be,
        stride_br,
        stride_bn,
        stride_on,
        LOG_NSEG: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        ATOMIC: tl.constexpr,
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
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            a_tile = tl.load(  # [BK, BR] = A_e^T block
                a_ptr
                + expert * stride_ae
                + offs_r[None, :] * stride_ar
                + offs_k[:, None] * stride_ak,
                mask=k_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            acc += tl.dot(x_tile, a_tile)
        w = tl.load(weight_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)  # [BM]
        z = (acc * w[:, None]).to(bt_ptr.dtype.element_ty)

        # expand: out[token] += z @ B_e^T, one block of d_out at a time           [BM, BN]
        for n0 in range(0, d_out, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < d_out
            b_tile = tl.load(  # [BR, BN] = B_e^T block
                bt_ptr
                + expert * stride_be
                + offs_r[:, None] * stride_br
                + offs_n[None, :] * stride_bn,
                mask=r_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            if ATOMIC:  # out [N, d_out] float32: += into the token's row
                tl.atomic_add(
                    out_ptr + token[:, None] * stride_on + offs_n[None, :],
                    tl.dot(z, b_tile),
                    mask=row_mask[:, None] & n_mask[None, :],
                    sem="relaxed",
                )
            else:  # out [P, d_out]: the pair's own row, no other program writes it
                tl.store(
                    out_ptr + pair[:, None] * stride_on + offs_n[None, :],
                    tl.dot(z, b_tile).to(out_ptr.dtype.element_ty),
                    mask=row_mask[:, None] & n_mask[None, :],
                )

    @triton.jit
    def _combine_kernel(
        out_ptr,
        y_ptr,
        slots_ptr,
        N,
        d_out,
        k,
        stride_on,
        stride_yn,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """``out[t] += sum_j y[t k + j]`` over the pairs with a slot, summed in float32 and
        rounded once to ``out``'s dtype."""
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        t_mask = tokens < N
        mask = t_mask[:, None] & (offs_n[None, :] < d_out)
        ptrs = out_ptr + tokens[:, None].to(tl.int64) * stride_on + offs_n[None, :]
        acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        for j in range(k):
            pair = tokens.to(tl.int64) * k + j
            used = tl.load(slots_ptr + pair, mask=t_mask, other=-1) >= 0
            acc += tl.load(
                y_ptr + pair[:, None] * stride_yn + offs_n[None, :],
                mask=mask & used[:, None],
                other=0.0,
            ).to(tl.float32)
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


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


def _launch(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    *,
    atomic: bool,
    block_m: int | None,
    block_n: int | None,
    block_k: int,
    num_warps: int,
    num_stages: int | None,
) -> None:
    """Sort the pairs by slot, count the tiles, run :func:`_sgmv_kernel` into ``out``."""
    E, r, d_in = A.shape
    d_out = B.shape[1]
    N, k = slots.shape
    P = N * k
    B_t = B.transpose(1, 2)  # [E, r, d_out]
    block_r = max(16, triton.next_power_of_2(r))
    wide = d_out >= 1024
    block_n = block_n or (64 if wide else BLOCK_N)
    num_stages = num_stages or (2 if wide else 3)
    if block_m is None:
        block_m = 32 if P < 64 * E else 64  # many small segments: smaller tiles waste less
    nseg = E + 1  # segment 0: slot -1 (no expert); segment 1 + s: slot s
    # Counting sort of the pairs by segment (three small kernels; ``torch.sort`` cost 143 us of
    # host time per call on an H100 host, more than the whole kernel takes on the device).
    flat = slots.reshape(-1)  # [P] (pair = token * k + j)
    counts = torch.zeros(nseg, dtype=torch.int32, device=x.device)  # [E + 1]
    rank = torch.empty(P, dtype=torch.int32, device=x.device)  # [P] rank within its segment
    grid = (triton.cdiv(P, _SORT_BLOCK),)
    _count_kernel[grid](flat, counts, rank, P, nseg, BLOCK=_SORT_BLOCK)
    ends = torch.empty(nseg, dtype=torch.int64, device=x.device)  # [E + 1] exclusive row ends
    tile_end = torch.empty_like(ends)  # [E + 1] cumulative tile counts
    _scan_kernel[(1,)](counts, ends, tile_end, nseg, BLOCK_M=block_m, BLOCK_S=1024)
    order = torch.empty(P, dtype=torch.int64, device=x.device)  # [P] pairs by segment
    _scatter_kernel[grid](flat, rank, counts, ends, order, P, nseg, BLOCK=_SORT_BLOCK)
    bound = -(-P // block_m) + min(nseg, P)  # static bound on the number of tiles
    _sgmv_kernel[(bound,)](
        x,
        A,
        B_t,
        out,
        order,
        weights.reshape(-1),
        ends,
        tile_end,
        nseg,
        k,
        d_in,
        d_out,
        r,
        x.stride(0),
        A.stride(0),
        A.stride(1),
        A.stride(2),
        B_t.stride(0),
        B_t.stride(1),
        B_t.stride(2),
        out.stride(0),
        LOG_NSEG=nseg.bit_length(),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        ATOMIC=atomic,
        num_warps=num_warps,
        num_stages=num_stages,
    )


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
    """Token-level mixing with the Triton kernels (CUDA, bf16/fp16), as a new delta.

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
        [N, d_out] float32 delta (the pairs are scatter-added into it with atomics).
    """
    N, d_out = slots.shape[0], B.shape[1]
    out = torch.zeros(N, d_out, dtype=torch.float32, device=x.device)  # [N, d_out]
    _launch(
        x.contiguous(),
        A,
        B,
        slots,
        weights,
        out,
        atomic=True,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def sgmv_token_add_(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    *,
    block_t: int = 16,
    block_n_combine: int = 128,
    **launch: int,
) -> torch.Tensor:
    """``out += delta`` in place (``out`` [N, d_out], rows contiguous), without atomics.

    Each pair's delta is written to its own row of a ``[N k, d_out]`` buffer in ``x``'s dtype
    (in pair order, so no two programs write one row), then one pass adds each token's ``k``
    rows to ``out``, summing in float32 and rounding once. Deterministic for any ``k``; ``launch``
    takes :func:`sgmv_token_delta`'s tile settings.

    Measured on an H100 (N = 16384, d_in = 2048, r = 16, top-2, bf16): 0.34 ms at E = 64 and
    0.36-0.39 ms at E = 1024 for d_out = 2048, against 0.54 and 0.59 ms for the float32 atomics
    plus ``out.add_`` (equal at d_out = 256). Without atomics, wide tiles (``block_n`` 128, 3
    stages) were the fastest at every shape tried (0.355 against 0.393 ms at E = 1024).
    """
    slots = slots.contiguous()
    N, k = slots.shape
    d_out = B.shape[1]
    y = torch.empty(N * k, d_out, dtype=x.dtype, device=x.device)  # [P, d_out]
    _launch(
        x.contiguous(),
        A,
        B,
        slots,
        weights,
        y,
        atomic=False,
        block_m=launch.get("block_m"),
        block_n=launch.get("block_n", BLOCK_N),
        block_k=launch.get("block_k", BLOCK_K),
        num_warps=launch.get("num_warps", 4),
        num_stages=launch.get("num_stages", 3),
    )
    grid = (triton.cdiv(N, block_t), triton.cdiv(d_out, block_n_combine))
    _combine_kernel[grid](
        out,
        y,
        slots,
        N,
        d_out,
        k,
        out.stride(0),
        y.stride(0),
        BLOCK_T=block_t,
        BLOCK_N=block_n_combine,
    )
    return out
