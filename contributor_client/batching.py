"""Turns tokenised examples into padded batches of similar length, for training and gates.

CPU training time is dominated by padding: batches are padded only to their longest member
(dynamic padding), and examples are grouped by length within shuffled buckets so that padding
stays small while batch order stays random.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

#: Batches per bucket when grouping by length: larger buckets pad less but shuffle less.
BUCKET_BATCHES = 50
#: Label value ignored by the loss (PyTorch's ``cross_entropy`` default).
IGNORE_INDEX = -100


def load_tokenizer(model_path: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a padding token (causal LMs often lack one)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> list[list[int]]:
    """Token ids of each text (with the model's special tokens), truncated, unpadded."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """Shuffled batches of indices into ``lengths``, members of a batch of similar length.

    Indices are shuffled, cut into buckets of ``BUCKET_BATCHES`` batches, sorted by length
    inside each bucket, cut into batches, and the batches shuffled again.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    bucket = batch_size * BUCKET_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), bucket):
        members = sorted(order[start : start + bucket], key=lambda i: lengths[i])
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of indices sorted by length, for evaluation where order does not matter."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(
    token_ids: Sequence[Sequence[int]],
    tokenizer: PreTrainedTokenizerBase,
    label_ids: Sequence[int] | None = None,
    causal_lm: bool = False,
) -> dict[str, torch.Tensor]:
    """Pad one batch into model inputs (``input_ids``, ``attention_mask`` [B, T], ``labels``).

    ``labels`` is ``label_ids`` [B] for classification, the input ids with padding set to
    ``IGNORE_INDEX`` [B, T] for causal LM (the model shifts them), absent otherwise.
    Padding goes on the tokenizer's ``padding_side``.
    """
    width = max(len(ids) for ids in token_ids)
    pad = int(tokenizer.pad_token_id)
    left = tokenizer.padding_side == "left"
    input_ids = torch.full((len(token_ids), width), pad, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)  # [B, T]
    for row, ids in enumerate(token_ids):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if causal_lm:
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # [B, T]
    elif label_ids is not None:
        batch["labels"] = torch.tensor(list(label_ids), dtype=torch.long)  # [B]
    return batch
