"""KV rows of continuous batching: prompts land in their rows, steps write at each row's own
position, and growing the buffers keeps what rows hold."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from moerge.coordinator.inference.generation.kv_rows import KVRows

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
