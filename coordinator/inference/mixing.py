"""Mix the top-k LoRA experts of one linear layer, computing only the experts that are selected.

Every adapted linear layer (module) keeps all experts' factors stacked in a bank (see
:mod:`.lora_bank`): ``A`` [E, r, d_in] and ``B`` [E, d_out, r], with each expert's LoRA
``scaling`` folded into its ``B`` and ranks below ``r`` zero-padded. A routing decision names,
per row, ``k`` slots ``s_j`` (``-1``: no expert) and weights ``w_j``; the delta added to the
frozen layer's output ``W x`` is::

    delta(x) = sum_j w_j B_{s_j} A_{s_j} x                                         [d_out]

PEFT's Arrow (``ArrowLoraLinearLayer.forward``) computes ``B_e A_e x`` for *all* ``E`` experts
and re-stacks all factors on every call: ``O(N E r (d_in + d_out))`` flops and an
``[N, E, d_out]`` intermediate. Here the cost is ``O(N k r (d_in + d_out))`` flops plus an
``O(N k log(N k))`` sort at most; ``E`` enters only through which rows of the bank are read.

Two granularities:

``example_mixed_delta`` (one decision per example, every token of the example shares it)
    Gather each example's ``k`` experts and concatenate them along the rank, ``A_b``
    [k r, d_in] and ``B_b^T`` [k r, d_out], then two batched matmuls (``bmm``)::

        z = (x_b A_b^T) * w_b                                                     [T, k r]
        delta_b = z B_b^T                                                         [T, d_out]

    This is Punica's BGMV ("batched gather matrix-vector", Chen et al., 2023,
    https://arxiv.org/abs/2310.18547) with the rank concatenation of S-LoRA's MBGMM (Sheng et
    al., 2023, https://arxiv.org/abs/2311.03285). It gathers only ``B k r (d_in + d_out)``
    weights and never synchronises with the host. The alternative, grouping examples by slot
    (sort + segments, one matmul per distinct expert), was measured slower on CPU for
    batch 32 x 128 tokens of MiniLM (d = 384, r = 8, 2 threads): 1.6-2.6 ms against 0.8-0.9 ms
    for the gathered bmm *even when all 32 examples share one expert*, because it must gather
    and scatter the activations ``[B, T, d]`` (much larger than ``k r d`` weights whenever
    ``T > k r``) and it needs the segment sizes on the host (a device sync on GPU).
    The segmented path pays off on CPU only for decode-like steps of wide models, where the
    gathered bmm degenerates into many [1, d] x [d, r] products: 64 examples x 1 token,
    d = 2048, r = 16, top-1, took 1.0-2.0 ms grouped against 10-11.5 ms gathered (whether 4 or
    64 distinct experts), while at d = 384, r = 8 the gathered bmm stayed faster (0.08 ms
    against 0.26 ms). So examples are grouped on CPU for ``k = 1``, ``T <= r`` and
    ``d_in >= 1024``; everywhere else (and always on GPU, where the grouping would need a host
    sync) the gathered bmm is used.

``token_mixed_delta`` (one decision per token, e.g. Arrow or PHATGOOSE inside each module)
    The ``P = N k`` (token, expert) pairs are computed in two stages, "shrink" then "expand"
    (Punica's SGMV naming)::

        z_p = w_p A_{s_p} x_{t_p}          [r]       for every pair p
        delta_t = sum_{p: t_p = t} B_{s_p} z_p    [d_out]

    Four implementations of the same math, chosen by device and dtype:

    * CPU, float32/float64 — *no sort at all*. Stage 1 is a sampled dense-dense matmul (SDDMM,
      ``torch.sparse.sampled_addmm``): ``x @ A_flat^T`` with ``A_flat = A.view(E r, d_in)``
      evaluated only at the ``k r`` columns ``s_j r .. s_j r + r - 1`` of each token's row (a
      CSR pattern); stage 2 is ``F.embedding_bag(mode="sum", per_sample_weights=z)`` over the
      rows of ``B^T`` viewed as ``[E r, d_out]``, i.e. a weighted sum of ``k r`` rows per
      token, which also performs the sum over ``j``. Both touch only the selected rows of the
      bank; measured (MiniLM sizes, N = 4096, k = 2, 2 threads) 1.1 + 0.7 ms at E = 8 and
      1.1 + 1.0 ms at E = 512, against 1.1 ms for a single adapter's ``B (A x)`` on the same
      tokens. (A sort + segmented matmul via ``torch._grouped_mm``'s CPU fallback took 4 ms at
      E = 8 and 13 ms at E = 512: its per-segment overhead grows with the number of distinct
      experts.)
    * CUDA, bf16/fp16, with Triton — one fused Triton kernel (:mod:`.sgmv_triton`) per
      tile of pairs of one expert: gather the token rows, shrink, expand, scatter-add, so
      neither ``[P, d_in]`` nor ``[P, d_out]`` is materialised; tiling on the device.
    * CUDA with ``torch._grouped_mm`` (no Triton; bf16 on SM90+, PyTorch >= 2.8) — grouped
      GEMM over segments: sort the pairs by slot, gather ``x`` in that order, segment ends
      ``offs`` = ``searchsorted(sorted slots, 0..E-1, right=True)`` on the device (no host sync),
      one grouped GEMM per stage against the bank viewed as ``A^T`` [E, d_in, r] and
      ``B^T`` [E, r, d_out] (no weight gather or copy; empty segments cost nothing), then the
      pairs are put back in token order and summed over ``j`` (deterministic, no atomics).
      Above ``GROUPED_MM_MAX_GROUPS`` slots, only the slots present are kept (host sync).
    * Anything else (bf16 on CPU, fp32 on CUDA, older PyTorch) — the same sort + segments with
      ``torch._grouped_mm`` where it accepts the device and dtype, else one matmul per
      non-empty segment.

A slot of ``-1`` contributes nothing whatever its weight (its weight is zeroed and the slot is
read as slot 0, so that padded rows stay branch-free). Everything here is inference code:
shapes are validated, gradients are not a goal.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from moerge.coordinator.inference import bgmv_triton, sgmv_triton
from moerge.triton_support import run_or_fall_back

__all__ = [
    "add_example_mixed_delta_",
    "add_token_mixed_delta_",
    "clean_example_decision",
    "example_mixed_delta",
    "grouped_mm_supported",
    "groups_example_mixing",
    "segment_matmul",
    "token_mixed_delta",
]

#: Set (with the error) when the Triton kernel failed to build or run here: it is not retried.
_TRITON_BROKEN: list[str] = []
#: The same for the example-routing (BGMV) kernels.
_BGMV_BROKEN: list[str] = []

#: ``torch._grouped_mm`` on CUDA refuses many segments ("Can't process more than 1024 groups",
#: PyTorch 2.11, raised on an H100 for exactly 1024); more are processed in chunks of this many.
GROUPED_MM_MAX_GROUPS = 512

#: On CPU, top-1 examples are grouped by expert (instead of gathering each example's weights)
#: when ``T <= r`` and ``d_in >= _SEGMENT_MIN_WIDTH`` (measurements in the module docstring).
_SEGMENT_MIN_WIDTH = 1024


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _check_bank(A: torch.Tensor, B: torch.Tensor) -> tuple[int, int, int, int]:
    if A.dim() != 3 or B.dim() != 3:
        raise ValueError(
            f"A and B must be [E, r, d_in] and [E, d_out, r], got {A.shape}, {B.shape}"
        )
    E, r, d_in = A.shape
    if B.shape[0] != E or B.shape[2] != r:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} disagree on E or r")
    return E, r, d_in, B.shape[1]


def _check_decision(slots: torch.Tensor, weights: torch.Tensor, rows: int) -> None:
    if slots.dim() != 2 or slots.shape != weights.shape or slots.shape[0] != rows:
        raise ValueError(
            f"slots and weights must both be [{rows}, k], got {tuple(slots.shape)} "
            f"and {tuple(weights.shape)}"
        )
    if slots.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"slots must be an integer tensor, got {slots.dtype}")


def _clean_decision(
    slots: torch.Tensor, weights: torch.Tensor, rows: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``slots``/``weights`` [rows, k]; map slot -1 to slot 0 with weight 0."""
    _check_decision(slots, weights, rows)
    slots = slots.long()
    empty = slots < 0
    weights = torch.where(
        empty, torch.zeros((), dtype=dtype, device=weights.device), weights.to(dtype)
    )
    return slots.masked_fill(empty, 0), weights


def _expert_rows_t(B: torch.Tensor) -> torch.Tensor:
    """``B`` [E, d_out, r] -> ``B^T`` rows [E r, d_out] (a view for the bank's layout)."""
    E, d_out, r = B.shape
    return B.transpose(1, 2).reshape(E * r, d_out)


@functools.cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs here for this dtype (probed once, then cached)."""
    grouped_mm = getattr(torch, "_grouped_mm", None)
    if grouped_mm is None:
        return False
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    try:
        a = torch.ones(16, 16, dtype=dtype, device=device_type)
        b = torch.ones(2, 16, 16, dtype=dtype, device=device_type)
        offs = torch.tensor([8, 16], dtype=torch.int32, device=device_type)
        out = grouped_mm(a, b, offs=offs)
        return bool((out == 16).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _grouped_mm_layout_ok(t: torch.Tensor) -> bool:
    """``torch._grouped_mm`` wants row- or column-major operands with 16-byte aligned strides."""
    size = t.element_size()
    s1, s2 = t.stride(-2), t.stride(-1)
    if s2 == 1:
        lead = s1
    elif s1 == 1:
        lead = s2
    else:
        return False
    return (lead * size) % 16 == 0 and t.data_ptr() % 16 == 0


def segment_matmul(x: torch.Tensor, W: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Segmented matmul: rows ``offs[g-1]:offs[g]`` of ``x`` times ``W[g]``.

    ``x`` [P, K] sorted by segment, ``W`` [G, K, M], ``offs`` [G] int32 inclusive segment ends
    (``offs[-1] == P``; empty segments allowed). Returns [P, M]. Uses ``torch._grouped_mm``
    where it runs for this device, dtype and layout (in calls of at most
    ``GROUPED_MM_MAX_GROUPS`` segments), else one matmul per non-empty segment.
    """
    G = W.shape[0]
    if (
        grouped_mm_supported(x.device.type, x.dtype)
        and _grouped_mm_layout_ok(x)
        and _grouped_mm_layout_ok(W)
    ):
        if G <= GROUPED_MM_MAX_GROUPS:
            return torch._grouped_mm(x, W, offs=offs)
        out = x.new_empty(x.shape[0], W.shape[-1])
        ends = offs.tolist()  # host sync: the row range of each chunk of segments
        for g0 in range(0, G, GROUPED_MM_MAX_GROUPS):
            g1 = min(g0 + GROUPED_MM_MAX_GROUPS, G)
            r0, r1 = (ends[g0 - 1] if g0 else 0), ends[g1 - 1]
            if r1 > r0:
                out[r0:r1] = torch._grouped_mm(x[r0:r1], W[g0:g1], offs=offs[g0:g1] - r0)
        return out
    out = x.new_empty(x.shape[0], W.shape[-1])
    start = 0
    for g, end in enumerate(offs.tolist()):  # host sync: segment bounds
        if end > start:
            torch.mm(x[start:end], W[g], out=out[start:end])
        start = end
    return out


# ------------------------------------------------------------------------------------------
# example-level mixing
# ------------------------------------------------------------------------------------------
def groups_example_mixing(
    device: torch.device, k: int, r: int, T: int, d_in: int, examples: int
) -> bool:
    """Whether :func:`example_mixed_delta` groups examples by expert (a CPU batch of wide top-1
    layers, where one grouped matmul per expert beats gathering every example's factors)."""
    return (
        k == 1 and device.type == "cpu" and r >= T and d_in >= _SEGMENT_MIN_WIDTH and examples > 1
    )


def example_mixed_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """``delta[b, t] = sum_j weights[b, j] * B[slots[b, j]] @ A[slots[b, j]] @ x[b, t]``.

    Args:
        x: [B, T, d_in] activations (``B`` examples of ``T`` tokens).
        A: [E, r, d_in] bank of down-projections.
        B: [E, d_out, r] bank of up-projections (scaling folded in); any strides, a view of a
            contiguous [E, r, d_out] buffer (the bank's layout) is the fastest.
        slots: [B, k] long, slots into the bank, ``-1`` for "no expert".
        weights: [B, k] mixing weights (linear merging: ``sum_j w_j B_j A_j x`` exactly).

    Returns:
        [B, T, d_out] delta, in ``x``'s dtype.
    """
    _, r, d_in, d_out = _check_bank(A, B)
    if x.dim() != 3 or x.shape[-1] != d_in:
        raise ValueError(f"x must be [B, T, {d_in}], got {tuple(x.shape)}")
    nb, T, _ = x.shape
    k = slots.shape[-1] if slots.dim() == 2 else 0
    slots, weights = _clean_decision(slots, weights, nb, x.dtype)
    xw = x.to(A.dtype)
    if groups_example_mixing(x.device, k, r, T, d_in, nb):
        delta = _example_delta_segmented(xw, A, B, slots[:, 0], weights[:, 0])
    else:
        # Gather: [B, k r, d_in] and [B, k r, d_out]
        flat = slots.reshape(-1)  # [B k]
        A_sel = A.index_select(0, flat).reshape(nb, k * r, d_in)
        Bt_sel = B.transpose(1, 2).index_select(0, flat).reshape(nb, k * r, d_out)
        z = torch.bmm(xw, A_sel.transpose(1, 2))  # [B, T, k r]
        z = z * weights.to(z.dtype).repeat_interleave(r, dim=1).unsqueeze(1)
        delta = torch.bmm(z, Bt_sel)  # [B, T, d_out]
    return delta.to(x.dtype)


def clean_example_decision(
    slots: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``slots``/``weights`` [B, k] -> (slots with ``-1`` mapped to 0, weights in ``dtype``
    with 0 there), once per forward: every adapted module of a step shares them."""
    return _clean_decision(slots, weights, slots.shape[0], dtype)


def add_example_mixed_delta_(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    *,
    kernels: bool = False,
) -> torch.Tensor:
    """``out += example_mixed_delta(x, A, B, slots, weights)`` in place, in five kernels.

    Serving's path: ``out`` [B, T, d_out] (the frozen layer's output), ``x`` [B, T, d_in], both
    in the bank's dtype; ``slots``/``weights`` [B, k] already cleaned
    (:func:`clean_example_decision`). A decode step runs this in every adapted module (88 in a
    22-layer model), so the kernel count, not the bytes, sets its cost: two gathers, the
    down-projection, the weighting and an up-projection that adds into ``out`` (``baddbmm_``).
    With ``kernels``, one token per example on CUDA in half precision, two Triton kernels do it
    instead, reading each row's factors in the bank without gathering them (:mod:`.bgmv_triton`).
    """
    nb, T, d_in = x.shape
    k, r, d_out = slots.shape[1], A.shape[1], B.shape[1]
    Bt = B.transpose(1, 2)  # [E, r, d_out]: the bank's own buffer
    if (
        kernels
        and T == 1
        and x.device.type == "cuda"
        and A.dtype in (torch.float16, torch.bfloat16)
        and all(t.stride(-1) == 1 for t in (out, x, A, Bt))
        and bgmv_triton.available()
        and not _BGMV_BROKEN
    ):
        added = run_or_fall_back(
            lambda: bgmv_triton.bgmv_add_(
                out.view(nb, d_out), x.view(nb, d_in), A, Bt, slots, weights
            ),
            _BGMV_BROKEN,
            "BGMV kernels",
            "PyTorch's gathered batched matmuls",
        )
        if added is not None:
            return out
    flat = slots.reshape(-1)  # [B k]
    A_sel = A.index_select(0, flat).view(nb, k * r, d_in)
    Bt_sel = Bt.index_select(0, flat).view(nb, k * r, d_out)
    z = torch.bmm(x, A_sel.transpose(1, 2)).view(nb, T, k, r)  # [B, T, k, r]
    z = (z * weights.view(nb, 1, k, 1)).view(nb, T, k * r)
    return out.baddbmm_(z, Bt_sel)


def _example_delta_segmented(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Top-1 example mixing grouped by slot: x [B, T, d_in], slot/weight [B] -> [B, T, d_out]."""
    nb, T, d_in = x.shape
    order = torch.argsort(slot, stable=True)  # [B]
    sorted_slot = slot[order]
    experts, counts = torch.unique_consecutive(sorted_slot, return_counts=True)  # [G]
    xs = (x.index_select(0, order) * weight[order].to(x.dtype).view(nb, 1, 1)).reshape(-1, d_in)
    offs = (torch.cumsum(counts, 0) * T).to(torch.int32)  # [G], ends in rows of xs
    z = segment_matmul(xs, A.index_select(0, experts).transpose(1, 2), offs)  # [B T, r]
    y = segment_matmul(z, B.transpose(1, 2).index_select(0, experts), offs)  # [B T, d_out]
    out = torch.empty_like(y).view(nb, T, -1)
    out.index_copy_(0, order, y.view(nb, T, -1))
    return out


# ------------------------------------------------------------------------------------------
# token-level mixing
# ------------------------------------------------------------------------------------------
def token_mixed_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    *,
    keep_float32: bool = False,
) -> torch.Tensor:
    """``delta[n] = sum_j weights[n, j] * B[slots[n, j]] @ A[slots[n, j]] @ x[n]``.

    Args:
        x: [N, d_in] tokens (all tokens of the batch, flattened).
        A: [E, r, d_in] bank of down-projections.
        B: [E, d_out, r] bank of up-projections (scaling folded in); the bank's layout, a
            transposed view of a contiguous [E, r, d_out] buffer, costs no copy.
        slots: [N, k] long, slots into the bank, ``-1`` for "no expert".
        weights: [N, k] mixing weights.
        keep_float32: return the Triton kernel's float32 accumulator as it is instead of
            rounding it to ``x``'s dtype (the bank adds it to the layer's output in one pass).

    Returns:
        [N, d_out] delta, in ``x``'s dtype (or float32, see ``keep_float32``). Cost independent
        of ``E`` (see module docstring).
    """
    _, _, d_in, d_out = _check_bank(A, B)
    if x.dim() != 2 or x.shape[-1] != d_in:
        raise ValueError(f"x must be [N, {d_in}], got {tuple(x.shape)}")
    N = x.shape[0]
    if N == 0 or (slots.dim() == 2 and slots.shape[1] == 0):
        return x.new_zeros(N, d_out)
    xw = x.to(A.dtype)
    if (
        x.device.type == "cuda"
        and A.dtype in (torch.float16, torch.bfloat16)
        and sgmv_triton.available()
        and not _TRITON_BROKEN
    ):
        # The kernel skips slot -1 itself (fewer launches: host time matters on GPU).
        _check_decision(slots, weights, N)
        delta = run_or_fall_back(
            lambda: sgmv_triton.sgmv_token_delta(xw, A, B, slots.long(), weights),
            _TRITON_BROKEN,
            "SGMV kernel",
            "the grouped-GEMM path",
        )
        if delta is not None:
            return delta if keep_float32 else delta.to(x.dtype)
    slots, weights = _clean_decision(slots, weights, N, A.dtype)
    if x.device.type == "cpu" and A.dtype in (torch.float32, torch.float64):
        delta = _token_delta_sparse(xw, A, B, slots, weights)
    else:
        delta = _token_delta_segmented(xw, A, B, slots, weights)
    return delta.to(x.dtype)


def token_mixing_without_host_sync(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`add_token_mixed_delta_` runs here without reading back to the host (so a
    CUDA graph can capture it): the fused Triton kernel (CUDA, half precision) does; the
    grouped paths read segment bounds back (``tolist``, ``unique_consecutive``)."""
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and sgmv_triton.available()
        and not _TRITON_BROKEN
    )


def add_token_mixed_delta_(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """``out += token_mixed_delta(x, A, B, slots, weights)`` in place: ``out`` [N, d_out].

    Serving adds the delta to the frozen layer's output. On CUDA with Triton (half precision)
    the kernel writes each (token, expert) pair's delta to its own row and one more pass adds
    the ``k`` rows of each token into ``out`` (:func:`.sgmv_triton.sgmv_token_add_`): no float32
    ``[N, d_out]`` buffer, no atomics, one rounding. Elsewhere it is ``out.add_(delta)``.
    """
    _check_bank(A, B)
    if (
        x.device.type == "cuda"
        and A.dtype in (torch.float16, torch.bfloat16)
        and out.dtype == A.dtype
        and out.dim() == 2
        and out.stride(1) == 1
        and sgmv_triton.available()
        and not _TRITON_BROKEN
    ):
        _check_decision(slots, weights, x.shape[0])
        added = run_or_fall_back(
            lambda: sgmv_triton.sgmv_token_add_(out, x.to(A.dtype), A, B, slots.long(), weights),
            _TRITON_BROKEN,
            "SGMV kernel",
            "the grouped-GEMM path",
        )
        if added is not None:
            return added
    return out.add_(token_mixed_delta(x, A, B, slots, weights, keep_float32=True))


def _token_delta_sparse(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """SDDMM + embedding_bag (CPU float): x [N, d_in], slots/weights [N, k] -> [N, d_out]."""
    E, r, d_in = A.shape
    N, k = slots.shape
    # Columns of A_flat^T (= rows of B^T) each token reads: [N, k r]
    cols = (slots.unsqueeze(-1) * r + torch.arange(r, device=x.device)).reshape(N, k * r)
    crow = torch.arange(0, N * k * r + 1, k * r, device=x.device)  # [N + 1]
    with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow,
            cols.reshape(-1),
            torch.zeros(N * k * r, dtype=x.dtype, device=x.device),
            size=(N, E * r),
            check_invariants=False,
        )
    # Stage 1 (shrink): z[n, j r + q] = <x[n], A[s_nj, q]>  only at the pattern: [N k r]
    z = torch.sparse.sampled_addmm(pattern, x, A.reshape(E * r, d_in).t(), beta=0.0).values()
    z = z.view(N, k, r) * weights.unsqueeze(-1)  # [N, k, r]
    # Stage 2 (expand + sum over j): delta[n] = sum_c z[n, c] B^T[cols[n, c]]  [N, d_out]
    return F.embedding_bag(
        cols, _expert_rows_t(B), per_sample_weights=z.reshape(N, k * r), mode="sum"
    )


def _token_delta_segmented(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Sort pairs by slot + grouped GEMM: x [N, d_in], slots/weights [N, k] -> [N, d_out]."""
    E = A.shape[0]
    N, k = slots.shape
    P = N * k
    flat_slot = slots.reshape(-1)  # [P]
    sorted_slot, order = torch.sort(flat_slot)  # [P], [P]
    token = torch.div(order, k, rounding_mode="floor")  # [P] token of each sorted pair
    xs = x.index_select(0, token)  # [P, d_in]
    w_sorted = weights.reshape(-1).index_select(0, order)  # [P]
    A_t = A.transpose(1, 2)  # [E, d_in, r]
    B_t = B.transpose(1, 2)  # [E, r, d_out]
    if (
        x.device.type == "cuda"
        and E <= GROUPED_MM_MAX_GROUPS
        and grouped_mm_supported("cuda", x.dtype)
        and all(_grouped_mm_layout_ok(t) for t in (xs, A_t, B_t))
    ):
        # Every bank slot is a segment (empty ones are free): no weight gather, no host sync.
        offs = sgmv_triton.segment_ends(sorted_slot, E).to(torch.int32)  # [E] segment ends
    else:
        # Only the experts present (host sync; the loop fallback then skips nothing).
        experts, counts = torch.unique_consecutive(sorted_slot, return_counts=True)  # [G]
        A_t = A_t.index_select(0, experts)  # [G, d_in, r]
        B_t = B_t.index_select(0, experts)  # [G, r, d_out]
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [G] segment ends
    z = segment_matmul(xs, A_t, offs)  # [P, r]  (shrink)
    z = z * w_sorted.to(z.dtype).unsqueeze(-1)
    y = segment_matmul(z, B_t, offs)  # [P, d_out]  (expand)
    # Back to (token, j) order, then sum over j: [N, d_out]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(P, device=order.device)
    return y.index_select(0, inverse).view(N, k, -1).sum(dim=1)
