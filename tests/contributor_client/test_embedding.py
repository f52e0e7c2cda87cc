"""The shared embedding space: mean pooling over real tokens, then L2 normalisation."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM

from moerge.contributor_client.batching import load_tokenizer
from moerge.embedding import pooled_embeddings

TEXTS = ["the good film", "a bad movie with an awful plot and a sad ending", "goal", "the team"]


def test_embedding_is_normalised_mean_of_last_hidden_state(tiny_bert: Path) -> None:
    model = AutoModel.from_pretrained(tiny_bert)
    tokenizer = load_tokenizer(str(tiny_bert))
    embeddings = pooled_embeddings(model, tokenizer, TEXTS, batch_size=4, max_length=64)
    assert embeddings.shape == (len(TEXTS), 32)
    for row, text in enumerate(TEXTS):
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]  # [T, H]
        expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
        torch.testing.assert_close(embeddings[row], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(TEXTS)))


def test_padding_and_batch_size_do_not_change_embeddings(tiny_bert: Path) -> None:
    model = AutoModel.from_pretrained(tiny_bert)
    tokenizer = load_tokenizer(str(tiny_bert))
    one_by_one = pooled_embeddings(model, tokenizer, TEXTS, batch_size=1)
    batched = pooled_embeddings(model, tokenizer, TEXTS, batch_size=3)
    torch.testing.assert_close(one_by_one, batched, atol=1e-5, rtol=1e-5)
    assert torch.equal(batched, pooled_embeddings(model, tokenizer, TEXTS, batch_size=3))


def test_truncation_keeps_only_max_length_tokens(tiny_bert: Path) -> None:
    model = AutoModel.from_pretrained(tiny_bert)
    tokenizer = load_tokenizer(str(tiny_bert))
    long_text = "good " * 50 + "bad " * 50
    truncated = pooled_embeddings(model, tokenizer, [long_text], max_length=20)
    prefix = pooled_embeddings(model, tokenizer, ["good " * 18], max_length=20)
    torch.testing.assert_close(truncated, prefix, atol=1e-5, rtol=1e-5)


def test_causal_lm_and_its_decoder_embed_alike(tiny_llama: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_llama))
    decoder = AutoModel.from_pretrained(tiny_llama)
    causal_lm = AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.testing.assert_close(
        pooled_embeddings(decoder, tokenizer, TEXTS, batch_size=2),
        pooled_embeddings(causal_lm, tokenizer, TEXTS, batch_size=2),
    )


def test_model_mode_is_restored(tiny_bert: Path) -> None:
    model = AutoModel.from_pretrained(tiny_bert).train()
    pooled_embeddings(model, load_tokenizer(str(tiny_bert)), TEXTS)
    assert model.training
