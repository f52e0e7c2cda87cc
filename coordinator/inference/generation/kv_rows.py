"""The running batch's KV cache: fixed rows, each written at its own position.

Continuous batching needs a cache whose rows are added (a request's prefilled prompt) and
freed (a finished or cancelled request) between two decode steps. transformers' own
``ContinuousBatchingManager`` packs all sequences into one row of a paged cache, which hides the
row a token belongs to from the model's layers; moerge's :class:`~..lora_bank.LoraBank` routes
per row (example-level routing) or per token, so it needs the rows. This module keeps one
preallocated buffer per layer, as vLLM's and TGI's CUDA-graph decoders do::

    keys/values of layer l   [R_max, H_kv, L, D]   row r's tokens at columns 0 .. n_r - 1
    positions                [R_max] long          n_r: the column row r writes next

* a request takes a free row (``k`` adjacent rows for an output ensemble); its prompt, prefilled
  on its own (:meth:`KVRows.write_prompt`), is copied to columns ``0 .. P - 1`` of its row, so
  rows never need padding or re-alignment when others join or leave;
* a decode step writes each row's new key/value at column ``n_r`` (one ``scatter_`` each per
  layer, :class:`RowCacheLayer`; on CUDA one Triton kernel for both, :mod:`.kv_write_triton`)
  and attends to columns ``0 .. n_r`` through an additive mask ``[R, 1, 1, L]`` (0 where
  ``column <= n_r``, the dtype's minimum elsewhere), with RoPE position ``n_r``: the same keys,
  positions and attention as an unpadded run;
* freeing a row is bookkeeping only; rows not in use decode garbage that nobody reads.

Every shape of a decode step is fixed (the rows used are padded up to a *bucket*, the
columns are the capacity ``L``) and no step reads a value back to the host, so the step can be
captured once in a CUDA graph and replayed (:mod:`.cuda_graphs`). Without a graph (CPU, or a
batch the graphs do not cover) a step attends to the columns in use only, rounded up to 64.
``L`` grows by doubling when a request needs more (graphs are then captured again).

Models: full-attention layers whose cache holds plain key/value tensors (Llama, Qwen2, Mistral
without a sliding window, SmolLM2, GPT-2); others are refused when the first request joins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from moerge.coordinator.inference.generation.kv_write_triton import try_write_step_

#: columns of a step without a graph are rounded up to this (fewer distinct shapes)
_COLUMN_STEP = 64
#: the smallest capacity allocated
_MIN_CAPACITY = 256


class UnsupportedCache(ValueError):
    """A model whose cache layers are not plain full-attention key/value tensors."""


class RowCacheLayer(CacheLayerMixin):
    """One layer's ``keys``/``values`` [R_max, H, L, D]; a decode step's ``update`` writes
    row ``r``'s new token at column ``positions[r]`` and returns the first ``rows.view[0]``
    rows and ``rows.view[1]`` columns (see :class:`KVRows`)."""

    is_compileable = False
    is_sliding = False
    # allocated up front by KVRows, never None (the mixin's are None until lazily initialised)
    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: KVRows) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self._rows = rows
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocated up front by :class:`KVRows`."""

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one decode step's keys and values into the rows' next column and return the rows'
        whole view, as transformers' cache layers do."""
        rows, columns = self._rows.view
        positions = self._rows.positions
        assert positions is not None  # allocated with the buffers
        if key_states.shape[0] != rows or key_states.shape[2] != 1:
            raise ValueError(
                f"a decode step writes one token in each of {rows} rows, got key states "
                f"{tuple(key_states.shape)}"
            )
        if not try_write_step_(self.keys, self.values, key_states, value_states, positions):
            index = positions[:rows].view(rows, 1, 1, 1)
            self.keys[:rows].scatter_(2, index.expand_as(key_states), key_states)
            self.values[:rows].scatter_(2, index.expand_as(value_states), value_states)
        return self.keys[:rows, :, :columns], self.values[:rows, :, :columns]

    def get_mask_sizes(self, query_length: int, *args: object) -> tuple[int, int]:
        """The attention mask's key length (the view's columns) and offset 0."""
        return self._rows.view[1], 0

    def get_seq_length(self, *args: object) -> int:
        """Columns in the current view (the longest row's length)."""
        return self._rows.view[1]

    def get_max_length(self) -> int:
        """Columns the buffers hold at most."""
        return self._rows.capacity


class RowCache(Cache):
    """The model-facing cache of :class:`KVRows` (one :class:`RowCacheLayer` per layer)."""

    def __init__(self, layers: list[RowCacheLayer]) -> None:
        super().__init__(layers=list(layers))
        #: the layers of ``self.layers``, typed as what they are (``Cache.layers`` is typed as
        #: the union of every kind of layer transformers has)
        self.row_layers = layers


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for layer in cache.layers:
        if (
            not isinstance(layer, CacheLayerMixin)
            or getattr(layer, "is_sliding", False)
            or layer.keys is None
            or layer.values is None
        ):
            raise UnsupportedCache(
                f"continuous batching supports full-attention KV caches only, got "
                f"{type(layer).__name__}"
            )
        out.append((layer.keys, layer.values))
    return out


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class KVRows:
    """Fixed-row KV buffers of the running requests (see the module docstring).

    Host-side bookkeeping (which rows are taken, each row's length) is plain Python; the
    device holds ``positions`` [R_max], copied from the host lengths before each step.
    """

    def __init__(self, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.lengths = [0] * max_rows  # host: tokens held by each row
        self.taken = [False] * max_rows
        self.capacity = 0  # L: columns allocated
        self.cache: RowCache | None = None
        self.positions: torch.Tensor | None = None  # [R_max] long, on the device
        self.view = (0, 0)  # (rows, columns) the next step attends over
        self.generation = 0  # bumped when buffers are reallocated (graphs must be recaptured)

    # -- rows ------------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        """Rows not held by any running request."""
        return self.taken.count(False)

    @property
    def used_bound(self) -> int:
        """One past the highest taken row (0 when none): the rows a step must cover."""
        for row in range(self.max_rows - 1, -1, -1):
            if self.taken[row]:
                return row + 1
        return 0

    def allocate(self, count: int) -> int | None:
        """The first row of ``count`` adjacent free rows, now taken; ``None`` if none fit."""
        run = 0
        for row in range(self.max_rows):
            run = run + 1 if not self.taken[row] else 0
            if run == count:
                start = row - count + 1
                for r in range(start, row + 1):
                    self.taken[r] = True
                return start
        return None

    def release(self, start: int, count: int) -> None:
        """Give back a request's rows: they are free and empty again."""
        for row in range(start, start + count):
            self.taken[row] = False
            self.lengths[row] = 0

    # -- storage ---------------------------------------------------------------------------
    def _allocate(self, like: list[tuple[torch.Tensor, torch.Tensor]], capacity: int) -> None:
        """(Re)allocate every layer for ``capacity`` columns, keeping what rows hold."""
        old = self.cache
        layers = []
        for i, (k, v) in enumerate(like):
            keys = k.new_zeros(self.max_rows, k.shape[1], capacity, k.shape[3])
            values = v.new_zeros(self.max_rows, v.shape[1], capacity, v.shape[3])
            if old is not None:
                keys[:, :, : self.capacity].copy_(old.row_layers[i].keys)
                values[:, :, : self.capacity].copy_(old.row_layers[i].values)
            layers.append(RowCacheLayer(keys, values, self))
        device, dtype = like[0][0].device, like[0][0].dtype
        self.cache = RowCache(layers)
        self.capacity = capacity
        self.positions = torch.zeros(self.max_rows, dtype=torch.long, device=device)
        self._columns = torch.arange(capacity, device=device)
        self._open = torch.zeros((), dtype=dtype, device=device)
        self._blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
        self.generation += 1

    def write_prompt(
        self,
        starts: Sequence[int],
        counts: Sequence[int],
        cache: DynamicCache,
        mask: torch.Tensor,
        need: int,
    ) -> None:
        """Copy a prefilled, left-padded batch into the taken rows.

        ``cache`` holds ``sum(counts)`` rows [R_new, H, T, D] with ``mask`` [R_new, T] (1 on
        real tokens); request ``i``'s ``counts[i]`` rows go to rows ``starts[i] ..``. ``need``:
        the most tokens any of these rows will hold (grows the buffers to fit).
        """
        layers = _layers(cache)
        if self.cache is None or need > self.capacity:
            self._allocate(layers, max(_MIN_CAPACITY, self.capacity * 2, _round_up(need, 256)))
        assert self.cache is not None
        device = layers[0][0].device
        targets = [
            start + j for start, count in zip(starts, counts, strict=True) for j in range(count)
        ]
        lengths = mask.sum(dim=1).tolist()  # [R_new]
        width = int(mask.shape[1])
        # one gather/scatter per layer: (source row, source column) -> (target row, column)
        src_rows: list[int] = []
        src_cols: list[int] = []
        dst_rows: list[int] = []
        dst_cols: list[int] = []
        for i, (target, n) in enumerate(zip(targets, lengths, strict=True)):
            src_rows += [i] * n
            src_cols += range(width - n, width)
            dst_rows += [target] * n
            dst_cols += range(n)
            self.lengths[target] = n
        index = [
            torch.tensor(x, dtype=torch.long, device=device)
            for x in (src_rows, src_cols, dst_rows, dst_cols)
        ]
        for (k, v), layer in zip(layers, self.cache.row_layers, strict=True):
            layer.keys[index[2], :, index[3]] = k[index[0], :, index[1]]
            layer.values[index[2], :, index[3]] = v[index[0], :, index[1]]

    def prepare_step(self, rows: int, full_width: bool, steps: int = 1) -> torch.Tensor:
        """Set the next step's view and device inputs; returns the mask [rows, 1, 1, C].

        ``full_width``: attend over all ``L`` columns (a CUDA graph's fixed shape); otherwise
        over the columns in use after ``steps`` more tokens, rounded up to 64.
        """
        assert self.positions is not None
        longest = min(max(self.lengths[:rows], default=0) + steps, self.capacity)
        columns = (
            self.capacity if full_width else min(self.capacity, _round_up(longest, _COLUMN_STEP))
        )
        self.view = (rows, columns)
        self.positions.copy_(torch.tensor(self.lengths, dtype=torch.long), non_blocking=True)
        return self.step_mask(rows, columns)

    def step_mask(self, rows: int, columns: int) -> torch.Tensor:
        """Device-side, from ``positions``: additive mask [rows, 1, 1, columns] (graph-safe)."""
        assert self.positions is not None
        allowed = self._columns[:columns] <= self.positions[:rows, None]  # [rows, C]
        return torch.where(allowed, self._open, self._blocked)[:, None, None, :]

    def advance(self, rows: Sequence[int], tokens: int = 1) -> None:
        """Each of ``rows`` now holds ``tokens`` more tokens (after a decode step or chunk)."""
        for row in rows:
            self.lengths[row] += tokens
