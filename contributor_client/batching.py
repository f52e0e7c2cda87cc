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


def encode_completions(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int,
) -> tuple[list[list[int]], list[int]]:
    """Token ids of each prompt + completion + EOS, and the number of prompt tokens in each.

    The prompt is encoded as :func:`encode` would (with the model's special tokens); the
    completion is encoded without them and closed with EOS, so that an expert learns where its
    answer stops. When the pair is over ``max_length`` the completion keeps up to
    ``max_length - 1`` tokens and the prompt is cut from its end to fit, so at least one prompt
    token and one completion token are always there.
    """
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    answer_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    token_ids, prompt_lengths = [], []
    for prompt, answer in zip(prompt_ids, answer_ids, strict=True):
        answer = (answer + eos)[: max_length - 1]
        prompt = prompt[: max_length - len(answer)]
        token_ids.append(prompt + answer)
        prompt_lengths.append(len(prompt))
    return token_ids, prompt_lengths


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
    prompt_lengths: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Pad one batch into model inputs (``input_ids``, ``attention_mask`` [B, T], ``labels``).

    ``labels`` is ``label_ids`` [B] for classification, the input ids with padding set to
    ``IGNORE_INDEX`` [B, T] for causal LM (the model shifts them), absent otherwise. With
    ``prompt_lengths`` (causal LM, see :func:`encode_completions`) the first
    ``prompt_lengths[b]`` tokens of row b are ``IGNORE_INDEX`` too: the loss covers only the
    completion. Padding goes on the tokenizer's ``padding_side``.
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
        learned = attention_mask.clone()  # [B, T]: 1 where the loss counts the token
        for row, length in enumerate(prompt_lengths or []):
            start = width - len(token_ids[row]) if left else 0
            learned[row, start : start + length] = 0
        batch["labels"] = input_ids.masked_fill(learned == 0, IGNORE_INDEX)  # [B, T]
    elif label_ids is not None:
        batch["labels"] = torch.tensor(list(label_ids), dtype=torch.long)  # [B]
    return batch
