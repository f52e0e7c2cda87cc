"""Causal-LM experts trained on prompt -> completion pairs learn the completion tokens only."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moerge.contributor_client.batching import (
    IGNORE_INDEX,
    collate,
    encode,
    encode_completions,
    load_tokenizer,
)
from moerge.contributor_client.recipe import TrainConfig
from moerge.contributor_client.training import train_expert
from moerge.expert_format import ADAPTER_CONFIG


def test_pairs_encode_prompt_then_completion_then_eos(tiny_llama: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_llama))
    ids, prompt_lengths = encode_completions(tokenizer, ["the film was"], ["good"], 32)
    prompt = encode(tokenizer, ["the film was"], 32)[0]
    answer = tokenizer("good", add_special_tokens=False)["input_ids"]
    assert ids == [prompt + answer + [tokenizer.eos_token_id]]
    assert prompt_lengths == [len(prompt)]


def test_long_pairs_cut_the_prompt_and_keep_a_completion_token(tiny_llama: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_llama))
    long_prompt = " ".join(["the film"] * 40)
    ids, prompt_lengths = encode_completions(tokenizer, [long_prompt], ["good bad"], 8)
    assert len(ids[0]) == 8 and prompt_lengths[0] == 5  # "good", "bad", EOS after 5 prompt ids
    ids, prompt_lengths = encode_completions(tokenizer, ["a"], [" ".join(["good"] * 20)], 8)
    assert len(ids[0]) == 8 and prompt_lengths[0] == 1


def test_collate_hides_prompt_tokens_from_the_loss_on_either_padding_side(
    tiny_llama: Path,
) -> None:
    tokenizer = load_tokenizer(str(tiny_llama))
    ids, prompt_lengths = encode_completions(
        tokenizer, ["the film was", "a plot"], ["good", "bad and boring"], 32
    )
    for side in ("right", "left"):
        tokenizer.padding_side = side
        batch = collate(ids, tokenizer, causal_lm=True, prompt_lengths=prompt_lengths)
        for row, (tokens, length) in enumerate(zip(ids, prompt_lengths, strict=True)):
            learned = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
            assert learned == tokens[length:]  # completion + EOS, nothing of prompt or padding
    plain = collate(ids, tokenizer, causal_lm=True)  # without prompt lengths: every real token
    assert int((plain["labels"] != IGNORE_INDEX).sum()) == sum(len(t) for t in ids)


def test_completion_expert_learns_its_answers(tiny_llama: Path, tmp_path: Path) -> None:
    prompts = ["the film was great", "the plot was awful"] * 20
    answers = ["good", "bad"] * 20
    config = TrainConfig(
        base_model=str(tiny_llama), task_type="causal_lm", epochs=8, batch_size=8,
        learning_rate=5e-2, validation_fraction=0.1, lora_dropout=0.0,
    )  # fmt: skip
    result = train_expert(prompts, answers, config, tmp_path, progress=False)
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["task_type"] == "CAUSAL_LM"
    assert result.label_names == []
    assert result.train_loss_curve[-1] < result.train_loss_curve[0]
    # validation counts the answer and EOS tokens only (two per example; a random model of
    # this vocabulary gets about 1 in 200 right)
    assert result.val_count == 4 and result.val_accuracy is not None
    assert result.val_accuracy >= 0.75


def test_completions_and_whole_texts_train_differently(tiny_llama: Path, tmp_path: Path) -> None:
    prompts = ["the film was great", "the plot was awful"] * 8
    answers = ["good", "bad"] * 8
    config = TrainConfig(
        base_model=str(tiny_llama), task_type="causal_lm", epochs=1, batch_size=8,
        validation_fraction=0.0,
    )  # fmt: skip
    pairs = train_expert(prompts, answers, config, tmp_path / "pairs", progress=False)
    texts = train_expert(prompts, None, config, tmp_path / "texts", progress=False)
    assert not torch.allclose(
        torch.tensor(pairs.train_loss_curve), torch.tensor(texts.train_loss_curve)
    )
