"""The running batch's KV cache: rows join and leave between decode steps.

Continuous batching needs a cache whose rows can be added (a request's prefilled prompt) and
removed (a finished or cancelled request) between two decode steps. transformers' own
``ContinuousBatchingManager`` packs all sequences into one row of a paged cache, which hides the
row a token belongs to from the model's layers; moerge's :class:`~..lora_bank.LoraBank` routes
per row (example-level routing) or per token, so it needs the rows. This module keeps the
classic padded layout instead (as TGI's first server did):

    keys/values of layer l   [R, H_kv, T, D]   left-padded: row r's real tokens are its last ones
    mask                     [R, T]            1 where a real token sits, 0 on padding

* :meth:`PaddedKVBatch.extend` appends the rows of a freshly prefilled cache, left-padding the
  shorter of the two along ``T``;
* :meth:`PaddedKVBatch.select` keeps some rows (in the given order);
* after :meth:`select`, columns that are padding in every row are dropped, so ``T`` is the
  longest running sequence, not the longest ever seen.

Each row's position ids are its count of real tokens, so padding never shifts positions (RoPE
sees the same positions as an unpadded run).

The cache is a plain ``DynamicCache`` of full-attention layers (Llama, Qwen2, Mistral without a
sliding window, SmolLM2, GPT-2): models with sliding-window or recurrent layers are refused when
the first request joins.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class UnsupportedCache(ValueError):
    """A model whose cache layers are not plain full-attention key/value tensors."""


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise UnsupportedCache(
                f"continuous batching supports full-attention KV caches only, got "
                f"{type(layer).__name__}"
            )
        out.append((layer.keys, layer.values))
    return out


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class PaddedKVBatch:
    """KV cache and attention mask of the rows currently decoding (see the module docstring)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [R, T] long

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def extend(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append the rows of ``cache`` (``mask`` [R_new, T_new]) below the current ones."""
        new_layers = _layers(cache)
        if self.cache is None or self.mask is None:
            self.cache = DynamicCache(ddp_cache_data=new_layers)
            self.mask = mask
            return
        length = max(self.length, int(mask.shape[1]))
        merged = [
            (
                torch.cat([_left_pad(k, length, 2), _left_pad(k2, length, 2)], dim=0),
                torch.cat([_left_pad(v, length, 2), _left_pad(v2, length, 2)], dim=0),
            )
            for (k, v), (k2, v2) in zip(_layers(self.cache), new_layers, strict=True)
        ]
        self.cache = DynamicCache(ddp_cache_data=merged)
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)], 0)

    def select(self, rows: torch.Tensor) -> None:
        """Keep ``rows`` (long [R'], in that order); drop all-padding leading columns."""
        if self.cache is None or self.mask is None:
            return
        if rows.numel() == 0:
            self.cache, self.mask = None, None
            return
        mask = self.mask.index_select(0, rows)
        start = int((mask.sum(dim=0) > 0).nonzero()[0]) if mask.any() else 0
        layers = [
            (k.index_select(0, rows)[:, :, start:], v.index_select(0, rows)[:, :, start:])
            for k, v in _layers(self.cache)
        ]
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = mask[:, start:]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For the next decode step: (attention mask [R, T+1], position ids [R, 1])."""
        assert self.mask is not None
        positions = self.mask.sum(dim=1, keepdim=True)  # [R, 1]: real tokens so far
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask, positions
