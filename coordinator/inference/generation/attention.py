"""Decode attention over grouped key/value heads that never copies the keys.

Llama-style models share each key/value head among ``G`` query heads (grouped-query attention,
GQA). With a mask, PyTorch's fused attention kernels do not take grouped heads, so transformers'
SDPA path (before 5.2x) repeats every key/value head ``G`` times before attending
(``repeat_kv``). A decode step of the running batch always has a mask (each row attends to its
own columns, :mod:`.kv_rows`), so on a 1.1B Llama at 32 rows over 256 columns every layer copied
two 33 MB tensors: measured on an H100, about 1.5 ms of a 7.3 ms step went to those copies.

With one query token per row the grouping folds into the query instead, and the keys stay as
they are::

    query [R, H_q, 1, D] -> [R, H_kv, G, D]     (query head h = kv head h // G, row h % G)
    keys, values          [R, H_kv, L, D]        (no copy)
    mask                  [R, 1, 1, L]           (broadcast over heads and the G rows)
    out   [R, H_kv, G, D] -> [R, 1, H_q, D]      (the layout attention functions return)

which is exactly the attention of every query head (newer transformers do the same for one
query token, ``pack_gqa``). Prefill (several query tokens), ungrouped models and anything
unusual go to transformers' own SDPA function unchanged.

:func:`use_decode_attention` registers this function with transformers' ``AttentionInterface``
(and SDPA's mask format with ``AttentionMaskInterface``) and switches a model that uses SDPA to
it; models on another attention implementation are left alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

#: the attention implementation name models are switched to
NAME = "moerge_decode_sdpa"


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` [R, H_q, T, D], ``key`` and
    ``value`` [R, H_kv, L, D]; returns ([R, T, H_q, D], None)."""
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    mask = attention_mask
    if (
        length != 1
        or kv_heads == heads
        or heads % kv_heads
        or dropout
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or (mask is not None and (mask.dim() != 4 or mask.shape[1] != 1))
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    packed = query.reshape(rows, kv_heads, heads // kv_heads, dim)  # [R, H_kv, G, D]
    if mask is not None:
        mask = mask[:, :, :, : key.shape[2]]  # [R, 1, 1, L]
    out = F.scaled_dot_product_attention(
        packed, key, value, attn_mask=mask, is_causal=False, scale=scaling
    )  # [R, H_kv, G, D]
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


def use_decode_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` from SDPA to :func:`decode_attention`; ``False`` if it uses another
    attention implementation (left as it is)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    config._attn_implementation = NAME
    return True
