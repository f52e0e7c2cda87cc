"""Triton kernel: per-row top-k of routing scores and the softmax over them, in one pass.

Token-level routers score every token against every expert of a module, ``S`` [N, E], then keep
``softmax(topk(S) / T)``. In PyTorch that is a ``topk`` (or k row maxima), a ``softmax`` over
the k values and a gather that maps module rows to global expert indices: five to eight
kernels that each read or write ``S``, and for E >= 256 ``torch.topk`` alone costs several
times the scoring matmul (0.45 ms against 0.09 ms at N = 16384, E = 1024 on an H100). This
kernel reads ``S`` once: each program walks ``BLOCK_R`` rows across E in blocks of
``BLOCK_E``, keeps a running, sorted top-k per row in registers (k <= 4), and writes the k
global indices and softmax weights. Optionally it takes ``|S|`` first (Arrow scores by the
absolute projection onto each prototype), saving the separate ``abs`` pass.

Ties resolve to the lower expert index (as ``torch.max`` does). Scores are compared in float32
as read, so half-precision scores rank exactly as ``torch.topk`` ranks them; the softmax is
computed in float32 and rounded once to the scores' dtype.
"""

from __future__ import annotations

import torch

from moerge.triton_support import KERNEL_ERRORS, available, run_or_fall_back, tl, triton

__all__ = ["KERNEL_ERRORS", "MAX_K", "available", "top_k_softmax_rows", "try_top_k_softmax"]

#: the largest k the kernel keeps in registers
MAX_K = 4

#: Set (with the error) when the kernel failed to build or run here: it is not retried.
_BROKEN: list[str] = []

#: (device, dtype, k, absolute, has members) whose builds for both alignments exist
_BUILT: set[tuple[torch.device, torch.dtype, int, bool, bool]] = set()


if triton is not None:

    @triton.jit
    def _insert(v0, i0, v1, i1, v2, i2, v3, i3, cv, ci, K: tl.constexpr):
        """Insert candidate ``(cv, ci)`` [R] into the sorted top-K ``(v0, i0) >= (v1, i1) ...``;
        a candidate equal to a kept value goes after it (the kept one has the lower index)."""
        take = cv > v0
        v0, cv = tl.where(take, cv, v0), tl.where(take, v0, cv)
        i0, ci = tl.where(take, ci, i0), tl.where(take, i0, ci)
        if K > 1:
            take = cv > v1
            v1, cv = tl.where(take, cv, v1), tl.where(take, v1, cv)
            i1, ci = tl.where(take, ci, i1), tl.where(take, i1, ci)
        if K > 2:
            take = cv > v2
            v2, cv = tl.where(take, cv, v2), tl.where(take, v2, cv)
            i2, ci = tl.where(take, ci, i2), tl.where(take, i2, ci)
        if K > 3:
            take = cv > v3
            v3 = tl.where(take, cv, v3)
            i3 = tl.where(take, ci, i3)
        return v0, i0, v1, i1, v2, i2, v3, i3

    @triton.jit
    def _store(
        idx_ptr,
        w_ptr,
        members_ptr,
        rows,
        row_mask,
        j: tl.constexpr,
        i,
        w,
        K: tl.constexpr,
        HAS_MEMBERS: tl.constexpr,
    ):
        if HAS_MEMBERS:
            i = tl.load(members_ptr + i, mask=row_mask, other=0)
        tl.store(idx_ptr + rows * K + j, i.to(tl.int64), mask=row_mask)
        tl.store(w_ptr + rows * K + j, w.to(w_ptr.dtype.element_ty), mask=row_mask)

    # R, E and the row stride vary with the batch and the number of experts: specialising on
    # them (Triton's default: a value of 1 or a multiple of 16 gets its own build) recompiled
    # the kernel when a new expert took E from 1,024 to 1,025, about 1 s on the serving path.
    # Unspecialised, though, the compiler cannot prove a row starts 16-aligned and loads one
    # element per instruction. So E and the stride arrive in units of ALIGN (16 when both are
    # multiples of 16, else 1): two builds at most, and wide loads whenever E allows them.
    @triton.jit(do_not_specialize=["R", "E_units", "stride_units"])
    def _top_k_softmax_kernel(
        s_ptr,
        idx_ptr,
        w_ptr,
        members_ptr,
        R,
        E_units,
        stride_units,
        inv_temperature,
        K: tl.constexpr,
        ABSOLUTE: tl.constexpr,
        HAS_MEMBERS: tl.constexpr,
        ALIGN: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        E = E_units * ALIGN
        stride_s = stride_units * ALIGN
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
        row_mask = rows < R
        neg = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        zero = tl.zeros((BLOCK_R,), tl.int32)
        v0, v1, v2, v3 = neg, neg, neg, neg
        i0, i1, i2, i3 = zero, zero, zero, zero
        for e0 in range(0, E, BLOCK_E):
            cols = e0 + tl.arange(0, BLOCK_E)  # [BE]
            s = tl.load(
                s_ptr + rows[:, None].to(tl.int64) * stride_s + cols[None, :],
                mask=row_mask[:, None] & (cols[None, :] < E),
                other=float("-inf"),
            ).to(tl.float32)  # [BR, BE]
            if ABSOLUTE:
                s = tl.where(cols[None, :] < E, tl.abs(s), float("-inf"))
            for _ in tl.static_range(K):  # the block's best K, best first, into the running K
                best, at = tl.max(
                    s, axis=1, return_indices=True, return_indices_tie_break_left=True
                )
                v0, i0, v1, i1, v2, i2, v3, i3 = _insert(
                    v0, i0, v1, i1, v2, i2, v3, i3, best, e0 + at, K
                )
                s = tl.where(cols[None, :] == (e0 + at)[:, None], float("-inf"), s)
        # softmax over the kept values / T (v0 is the largest)
        p0 = tl.full((BLOCK_R,), 1.0, tl.float32)
        total = p0
        if K > 1:
            p1 = tl.exp((v1 - v0) * inv_temperature)
            total += p1
        if K > 2:
            p2 = tl.exp((v2 - v0) * inv_temperature)
            total += p2
        if K > 3:
            p3 = tl.exp((v3 - v0) * inv_temperature)
            total += p3
        _store(idx_ptr, w_ptr, members_ptr, rows, row_mask, 0, i0, p0 / total, K, HAS_MEMBERS)
        if K > 1:
            _store(idx_ptr, w_ptr, members_ptr, rows, row_mask, 1, i1, p1 / total, K, HAS_MEMBERS)
        if K > 2:
            _store(idx_ptr, w_ptr, members_ptr, rows, row_mask, 2, i2, p2 / total, K, HAS_MEMBERS)
        if K > 3:
            _store(idx_ptr, w_ptr, members_ptr, rows, row_mask, 3, i3, p3 / total, K, HAS_MEMBERS)


def top_k_softmax_rows(
    scores: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    *,
    absolute: bool = False,
    members: torch.Tensor | None = None,
    block_r: int = 32,
    block_e: int = 128,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(topk(f(scores), k) / temperature)`` per row, ``f`` = ``abs`` or identity.

    Args:
        scores: [R, E] on CUDA, rows contiguous (any float dtype; compared in float32).
        k: 1 <= k <= min(E, ``MAX_K``).
        members: optional [E] int64 map from columns to global expert indices.

    Returns:
        ``(indices [R, k] int64, weights [R, k] in scores' dtype)``, best first.
    """
    R, E = scores.shape
    if not 1 <= k <= min(E, MAX_K):
        raise ValueError(f"k must be between 1 and {min(E, MAX_K)}, got {k}")
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    indices = torch.empty(R, k, dtype=torch.int64, device=scores.device)
    weights = torch.empty(R, k, dtype=scores.dtype, device=scores.device)
    if R == 0:
        return indices, weights
    align = 16 if E % 16 == 0 and scores.stride(0) % 16 == 0 else 1
    grid = (triton.cdiv(R, block_r),)
    _top_k_softmax_kernel[grid](
        scores,
        indices,
        weights,
        members if members is not None else indices,
        R,
        E // align,
        scores.stride(0) // align,
        1.0 / float(temperature),
        K=k,
        ABSOLUTE=absolute,
        HAS_MEMBERS=members is not None,
        ALIGN=align,
        BLOCK_R=block_r,
        BLOCK_E=block_e,
        num_warps=num_warps,
    )
    return indices, weights


def _build_both_alignments(
    scores: torch.Tensor, k: int, absolute: bool, members: torch.Tensor | None
) -> None:
    """Build the kernel for both column alignments on a router's first call (a few rows), so
    that an expert joining later (E from 1,024 to 1,025, say) finds its build ready instead of
    compiling on the serving path."""
    key = (scores.device, scores.dtype, k, absolute, members is not None)
    if key in _BUILT:
        return
    for width in (16 * MAX_K, 16 * MAX_K + 1):
        dummy = torch.zeros(1, width, dtype=scores.dtype, device=scores.device)
        ids = None if members is None else torch.arange(width, device=scores.device)
        top_k_softmax_rows(dummy, k, absolute=absolute, members=ids)
    _BUILT.add(key)


def try_top_k_softmax(
    scores: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    *,
    absolute: bool = False,
    members: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`top_k_softmax_rows` where it can run (CUDA, Triton, 2-D scores, k <= ``MAX_K``,
    the kernel not broken here), else ``None``: the caller takes its PyTorch path."""
    if not (
        scores.device.type == "cuda"
        and scores.dim() == 2
        and k <= MAX_K
        and available()
        and not _BROKEN
    ):
        return None

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        _build_both_alignments(scores, k, absolute, members)
        return top_k_softmax_rows(scores, k, temperature, absolute=absolute, members=members)

    return run_or_fall_back(
        run,
        _BROKEN,
        "top-k kernel",
        "torch.topk",
    )
