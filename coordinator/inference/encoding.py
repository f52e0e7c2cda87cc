"""Tokenisation of an engine batch: done once, shared by the routing embedding and the experts.

An example-level router routes the mean-pooled last hidden state of the frozen base model
(:mod:`moerge.embedding`) and the experts then run on the same texts through the same
tokenizer. A batch is tokenised once and rows are sliced out of it, instead of once for the
routing embedding and once more per group of requests: on small models tokenisation is a
visible part of a batch's CPU time (benchmarks/results/predict_overhead.md).

A slice of rows is trimmed to its longest row, so it equals the tokenizer's own output for
those texts alone (padding is on one side, left or right). The routing embedding may reuse a
row only where its ids are those the embedding space's tokenisation (truncated at
:data:`~moerge.embedding.EMBEDDING_MAX_LENGTH`) would give: the row is not longer than that,
and was not cut by the engine's own truncation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import BatchEncoding, PreTrainedTokenizerBase

from moerge.coordinator.inference.errors import InputTooLong
from moerge.embedding import EMBEDDING_MAX_LENGTH, mean_pool


def tokenise(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int | None,
    causal_lm: bool,
) -> BatchEncoding:
    """``texts`` padded to the longest, as tensors; truncated at ``max_length`` unless None."""
    return tokenizer(
        texts,
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
        return_tensors="pt",
        # decoders take no segment ids (generate() refuses unused inputs)
        return_token_type_ids=False if causal_lm else None,
    )


def check_lengths(enc: BatchEncoding, max_length: int) -> None:
    """Raise :class:`InputTooLong` for the first row of ``enc`` over ``max_length`` tokens."""
    lengths = enc["attention_mask"].sum(dim=1)  # [B]
    too_long = (lengths > max_length).nonzero().flatten().tolist()
    if too_long:
        i = too_long[0]
        raise InputTooLong(f"input {i} has {int(lengths[i])} tokens; the limit is {max_length}")


def rows_of(enc: BatchEncoding, index: Sequence[int]) -> BatchEncoding:
    """Rows ``index`` of ``enc``, without the padding columns no selected row needs."""
    rows = torch.as_tensor(list(index), dtype=torch.long)
    mask = enc["attention_mask"][rows]  # [n, T]
    used = mask.any(dim=0).nonzero().flatten()  # padding is on one side: a contiguous range
    start, stop = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 0)
    return BatchEncoding({key: value[rows, start:stop] for key, value in enc.items()})


def embeddings_of(model: nn.Module, enc: BatchEncoding, causal_lm: bool) -> torch.Tensor:
    """Routing embeddings of the rows of ``enc`` (on the model's device): float32 [B, H] on CPU.

    :func:`moerge.embedding.pooled_embeddings` without its tokenisation: the mean of the last
    hidden state over real tokens, L2-normalised. The engine's model is always in eval mode.
    """
    if causal_lm:
        # The bare decoder (transformers' ``base_model``: ``model`` of a Llama, ``transformer``
        # of a GPT-2) ends with the final norm, so its last hidden state is the causal LM's last
        # entry of ``hidden_states``: the same numbers without the LM head over every position
        # or a KV cache (an extra forward per routed batch, so it counts).
        decoder = getattr(model, "base_model", model)
        if isinstance(decoder, nn.Module) and decoder is not model:
            hidden = decoder(**enc, use_cache=False).last_hidden_state
        else:
            hidden = model(**enc, output_hidden_states=True, use_cache=False).hidden_states[-1]
    else:
        hidden = model(**enc).last_hidden_state  # [B, T, H]
    pooled = mean_pool(hidden.float(), enc["attention_mask"])  # [B, H]
    return nn.functional.normalize(pooled, p=2, dim=-1).cpu()


class SharedEncoding:
    """One tokenisation of a batch's texts; :meth:`of` and :meth:`embed` serve subsets of them.

    ``enc`` is the engine's tokenisation (on its device) of ``texts``; ``truncated_at`` is the
    engine's truncation length, if it truncates. Texts are looked up by value: equal texts have
    equal rows.
    """

    def __init__(
        self,
        enc: BatchEncoding,
        texts: Sequence[str],
        truncated_at: int | None,
        embed_rows: Callable[[BatchEncoding], torch.Tensor],
        embed_texts: Callable[[list[str]], torch.Tensor],
    ) -> None:
        self.enc = enc
        self.row = {text: i for i, text in enumerate(texts)}
        lengths = enc["attention_mask"].sum(dim=1)  # [B]
        fits = lengths <= EMBEDDING_MAX_LENGTH
        if truncated_at is not None:  # a row of exactly that length may have been cut
            fits &= lengths < truncated_at
        self.routable = fits.tolist()  # [B] the row's ids are the embedding space's
        self._embed_rows = embed_rows
        self._embed_texts = embed_texts

    def of(self, texts: Sequence[str]) -> BatchEncoding | None:
        """The encoding of ``texts`` (rows in that order), or None if one was not encoded."""
        rows = [self.row.get(text) for text in texts]
        if any(r is None for r in rows):
            return None
        return rows_of(self.enc, rows)  # type: ignore[arg-type]

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Routing embeddings [B, H] of ``texts``, from the shared ids where they are the same."""
        rows = [self.row.get(text) for text in texts]
        if any(r is None or not self.routable[r] for r in rows):
            return self._embed_texts(texts)
        return self._embed_rows(rows_of(self.enc, rows))  # type: ignore[arg-type]
