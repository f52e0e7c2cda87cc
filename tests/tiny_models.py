"""Tiny, randomly initialised models and tokenizers built from transformers configs.

Tests never download anything: each helper writes a complete model directory (config, weights,
tokenizer) that ``from_pretrained`` loads like a real checkpoint, in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

#: A small closed vocabulary; words outside it map to [UNK].
WORDS = [
    "the",
    "a",
    "an",
    "and",
    "or",
    "but",
    "of",
    "to",
    "in",
    "on",
    "for",
    "with",
    "at",
    "by",
    "from",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "it",
    "this",
    "that",
    "good",
    "bad",
    "great",
    "awful",
    "fine",
    "poor",
    "love",
    "hate",
    "like",
    "enjoy",
    "boring",
    "exciting",
    "film",
    "movie",
    "plot",
    "actor",
    "scene",
    "music",
    "story",
    "ending",
    "sport",
    "match",
    "team",
    "goal",
    "player",
    "win",
    "lose",
    "score",
    "league",
    "cup",
    "season",
    "money",
    "bank",
    "market",
    "stock",
    "price",
    "trade",
    "growth",
    "profit",
    "loss",
    "economy",
    "company",
    "shares",
    "tech",
    "computer",
    "phone",
    "software",
    "internet",
    "data",
    "chip",
    "apple",
    "google",
    "online",
    "digital",
    "game",
    "network",
    "politics",
    "government",
    "minister",
    "vote",
    "election",
    "party",
    "law",
    "policy",
    "tax",
    "labour",
    "tory",
    "council",
    "food",
    "taste",
    "sweet",
    "salty",
    "dog",
    "cat",
    "tree",
    "river",
    "mountain",
    "city",
    "house",
    "car",
    "road",
    "sea",
    "sky",
    "sun",
    "moon",
    "red",
    "green",
    "blue",
    "big",
    "small",
    "old",
    "new",
    "fast",
    "slow",
    "happy",
    "sad",
    "one",
    "two",
    "three",
    "four",
    "five",
]

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]


def _word_tokenizer(cls_token: str, sep_token: str) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls_token} $A {sep_token}",
        special_tokens=[(cls_token, vocab[cls_token]), (sep_token, vocab[sep_token])],
    )
    return tok


def vocab_size() -> int:
    return len(SPECIALS) + len(dict.fromkeys(WORDS))


def make_tiny_bert(
    path: str | Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0
) -> Path:
    """Write a tiny BERT encoder (modules named like MiniLM: ``...attention.self.query``)."""
    path = Path(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer("[CLS]", "[SEP]"),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    tokenizer.save_pretrained(path)
    return path


def make_tiny_llama(
    path: str | Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0
) -> Path:
    """Write a tiny Llama-style causal LM (modules ``q_proj``/``k_proj``/``v_proj``/``o_proj``)."""
    path = Path(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=SPECIALS.index("<s>"),
        eos_token_id=SPECIALS.index("</s>"),
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer("<s>", "</s>"),
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=128,
    )
    tokenizer.save_pretrained(path)
    return path
