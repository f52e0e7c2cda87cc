"""Decode attention over grouped heads equals transformers' SDPA attention with repeated keys."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from moerge.coordinator.inference.generation.attention import decode_attention


class GroupedAttention(torch.nn.Module):
    """The attributes transformers' attention functions read from a Llama attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("mask_kind", ["additive", "bool", "none"])
def test_one_query_token_attends_like_sdpa_with_repeated_keys(mask_kind):
    torch.manual_seed(0)
    rows, heads, kv_heads, columns, dim = 5, 8, 2, 12, 16
    query = torch.randn(rows, heads, 1, dim)
    key, value = torch.randn(2, rows, kv_heads, columns, dim)
    lengths = torch.tensor([1, 4, 7, 12, 9])
    allowed = torch.arange(columns)[None, :] < lengths[:, None]  # [R, L]
    mask = {
        "additive": torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None, None, :],
        "bool": allowed[:, None, None, :],
        "none": None,
    }[mask_kind]
    module = GroupedAttention(heads // kv_heads)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    got, weights = decode_attention(module, query, key, value, mask, scaling=0.25)
    assert weights is None
    assert got.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_several_query_tokens_go_to_sdpa_unchanged():
    torch.manual_seed(1)
    query = torch.randn(2, 4, 3, 8)
    key, value = torch.randn(2, 2, 2, 3, 8)
    module = GroupedAttention(2)
    expected, _ = sdpa_attention_forward(module, query, key, value, None)
    got, _ = decode_attention(module, query, key, value, None)
    torch.testing.assert_close(got, expected)
