"""KV rows of continuous batching: prompts land in their rows, steps write at each row's own
position, and growing the buffers keeps what rows hold."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from moerge.coordinator.inference.generation import kv_write_triton
from moerge.coordinator.inference.generation.kv_rows import KVRows
from tests.inference.triton_device import triton_device

LAYERS, HEADS, DIM = 2, 2, 4


def prefilled(lengths: list[int], width: int) -> tuple[DynamicCache, torch.Tensor]:
    """A left-padded prefill of ``len(lengths)`` rows: token t of row i has key value
    ``100 i + t`` (values: the negative), padding zeros."""
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    keys = torch.zeros(len(lengths), HEADS, width, DIM)
    for i, n in enumerate(lengths):
        for t in range(n):
            keys[i, :, width - n + t] = 100 * i + t
    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(keys.clone(), -keys.clone(), layer)
    return cache, mask


def test_prompts_are_copied_unpadded_to_their_rows():
    rows = KVRows(max_rows=4)
    cache, mask = prefilled([3, 5], width=5)  # the caller took rows 2 and 0 (not checked)
    rows.write_prompt([2, 0], [1, 1], cache, mask, need=10)
    assert rows.lengths == [5, 0, 3, 0]
    layer = rows.cache.layers[1]
    assert layer.keys[2, 0, :3, 0].tolist() == [0.0, 1.0, 2.0]  # row 2: request 0's 3 tokens
    assert layer.keys[0, 1, :5, 0].tolist() == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert layer.values[0, 1, :5, 0].tolist() == [-100.0, -101.0, -102.0, -103.0, -104.0]


def test_a_step_writes_each_row_at_its_own_position_and_masks_the_rest():
    rows = KVRows(max_rows=2)
    cache, mask = prefilled([2, 4], width=4)
    rows.allocate(2)
    rows.write_prompt([0, 1], [1, 1], cache, mask, need=8)
    step_mask = rows.prepare_step(2, full_width=False)  # [2, 1, 1, C]
    assert step_mask.shape[-1] == 64  # the columns in use, rounded up
    open_columns = (step_mask[:, 0, 0] == 0).sum(dim=1).tolist()
    assert open_columns == [3, 5]  # the prompt plus the token being written
    new = torch.full((2, HEADS, 1, DIM), 7.0)
    keys, _ = rows.cache.layers[0].update(new, -new)
    assert keys[0, 0, 2, 0] == 7.0 and keys[1, 0, 4, 0] == 7.0
    assert keys[0, 0, 1, 0] == 1.0 and keys[1, 0, 3, 0] == 103.0  # the prompts untouched
    rows.advance([0, 1])
    assert rows.lengths[:2] == [3, 5]


def test_growing_the_buffers_keeps_every_rows_tokens():
    rows = KVRows(max_rows=2)
    cache, mask = prefilled([3], width=3)
    rows.allocate(1)
    rows.write_prompt([0], [1], cache, mask, need=10)
    capacity, generation = rows.capacity, rows.generation
    cache, mask = prefilled([2], width=2)
    rows.allocate(1)
    rows.write_prompt([1], [1], cache, mask, need=capacity + 1)
    assert rows.capacity >= capacity + 1 and rows.generation == generation + 1
    assert rows.cache.layers[0].keys[0, 0, :3, 0].tolist() == [0.0, 1.0, 2.0]
    assert rows.cache.layers[0].keys[1, 0, :2, 0].tolist() == [0.0, 1.0]


def test_rows_are_taken_lowest_first_and_runs_stay_adjacent():
    rows = KVRows(max_rows=5)
    assert [rows.allocate(1), rows.allocate(1), rows.allocate(1)] == [0, 1, 2]
    rows.release(1, 1)
    assert rows.allocate(2) == 3  # an ensemble's two rows: the first adjacent free pair
    assert rows.allocate(1) == 1
    assert rows.allocate(1) is None


@pytest.mark.skipif(triton_device() is None, reason="needs Triton (CUDA or its interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_write_is_the_two_scatters_bit_for_bit(dtype: torch.dtype) -> None:
    device = triton_device()
    R_max, heads, L, D, rows = 6, 3, 16, 24, 4  # D not a power of two: masked lanes
    torch.manual_seed(0)
    keys = torch.randn(R_max, heads, L, D).to(device, dtype)
    values = torch.randn(R_max, heads, L, D).to(device, dtype)
    # as a model produces them: [rows, 1, heads, D] transposed, so not contiguous
    new_k = torch.randn(rows, 1, heads, D).to(device, dtype).transpose(1, 2)
    new_v = torch.randn(rows, 1, heads, D).to(device, dtype).transpose(1, 2)
    positions = torch.tensor([3, 0, 15, 7, 9, 9], device=device)
    expected_k, expected_v = keys.clone(), values.clone()
    index = positions[:rows].view(rows, 1, 1, 1)
    expected_k[:rows].scatter_(2, index.expand_as(new_k), new_k)
    expected_v[:rows].scatter_(2, index.expand_as(new_v), new_v)
    kv_write_triton.write_step_(keys, values, new_k, new_v, positions)
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
