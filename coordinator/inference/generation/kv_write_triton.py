"""One Triton kernel that writes a decode step's keys and values into the row cache.

A decode step of :class:`~.kv_rows.RowCacheLayer` stores each row's new key and value at the
row's next column::

    keys[r, h, n_r, :] = key_states[r, h, 0, :]       values likewise    r < rows, h < H_kv

PyTorch does that with one ``scatter_`` for the keys and one for the values of every layer: 44
kernels per step of a 22-layer model, about 0.2 ms of a 3.6 ms decode step on an H100 (1.1B
Llama at 32 rows, ``benchmarks/decode_profile.py``), each moving a few kilobytes. Here one
kernel per layer writes both, one program per (row, head), reading the column ``n_r`` from the
device (``positions``), so a CUDA graph can hold it. It copies bits (no arithmetic), so its
result is the scatters' exactly.
"""

from __future__ import annotations

import torch

from moerge.triton_support import run_or_fall_back, tl, triton

__all__ = ["try_write_step_", "write_step_"]

#: set to False to keep the two scatters (benchmarks compare the two)
TRITON_KERNEL = True
_BROKEN: list[str] = []  # the kernel's build or launch error, once it failed

if triton is not None:

    @triton.jit
    def _write_kernel(
        k_ptr,
        v_ptr,
        keys_ptr,
        values_ptr,
        positions_ptr,
        heads,
        d,
        sk_r,
        sk_h,
        sk_d,
        sv_r,
        sv_h,
        sv_d,
        sc_r,
        sc_h,
        sc_l,
        BLOCK: tl.constexpr,
    ):
        """Program (row r, head h): keys/values[r, h, positions[r], :] = k/v[r, h, 0, :]."""
        r = tl.program_id(0)
        h = tl.program_id(1)
        column = tl.load(positions_ptr + r)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < d
        target = r * sc_r + h * sc_h + column * sc_l + offsets  # the cache's last dim is dense
        k = tl.load(k_ptr + r * sk_r + h * sk_h + offsets * sk_d, mask=mask)
        tl.store(keys_ptr + target, k, mask=mask)
        v = tl.load(v_ptr + r * sv_r + h * sv_h + offsets * sv_d, mask=mask)
        tl.store(values_ptr + target, v, mask=mask)


def write_step_(
    keys: torch.Tensor,
    values: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Write ``key_states``/``value_states`` [rows, H_kv, 1, D] into ``keys``/``values``
    [R_max, H_kv, L, D] (same layout, last dimension dense) at column ``positions[r]`` of each
    row ``r < rows``; ``positions`` [>= rows] long, on the same device."""
    rows, heads, _, d = key_states.shape
    if keys.stride() != values.stride() or keys.stride(-1) != 1:
        raise ValueError("keys and values must share one layout with a dense last dimension")
    if rows == 0:
        return
    _write_kernel[(rows, heads)](
        key_states,
        value_states,
        keys,
        values,
        positions,
        heads,
        d,
        key_states.stride(0),
        key_states.stride(1),
        key_states.stride(3),
        value_states.stride(0),
        value_states.stride(1),
        value_states.stride(3),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        BLOCK=triton.next_power_of_2(d),
    )


def try_write_step_(
    keys: torch.Tensor,
    values: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    positions: torch.Tensor,
) -> bool:
    """:func:`write_step_` on CUDA with Triton; False where it does not run (the CPU, no
    Triton, switched off, or its kernel failed once: a warning says so), for the caller to
    scatter instead."""
    if not (TRITON_KERNEL and triton is not None and not _BROKEN and keys.is_cuda):
        return False
    if keys.stride() != values.stride() or keys.stride(-1) != 1:
        return False

    def write() -> bool:
        write_step_(keys, values, key_states, value_states, positions)
        return True

    return bool(run_or_fall_back(write, _BROKEN, "KV write kernel", "two scatter_ calls"))
