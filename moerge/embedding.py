"""The one definition of the embedding space shared by statistics and routing.

Contributors summarise their data with these embeddings and the coordinator routes queries
with them, so both sides must call exactly this function with the same base model: mean-pool
the last hidden state over non-padding tokens, then L2-normalise. That is the
sentence-transformers recipe of all-MiniLM-L6-v2 (``1_Pooling`` mean tokens + ``2_Normalize``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: Token limit of the embedding space (all-MiniLM-L6-v2's ``max_seq_length``).
EMBEDDING_MAX_LENGTH = 256
#: Texts per forward pass; results do not depend on it beyond float rounding.
EMBEDDING_BATCH_SIZE = 32


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average ``hidden`` [B, T, H] over the positions where ``attention_mask`` [B, T] is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    summed = (hidden * mask).sum(dim=1)  # [B, H]
    counts = mask.sum(dim=1).clamp(min=1e-9)  # [B, 1]
    return summed / counts


@torch.inference_mode()
def pooled_embeddings(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = EMBEDDING_BATCH_SIZE,
    max_length: int = EMBEDDING_MAX_LENGTH,
) -> torch.Tensor:
    """Embed ``texts`` -> float32 [N, H], one unit-norm row per text, in input order.

    Works for any Hugging Face encoder (``AutoModel``) or causal LM: the last entry of
    ``hidden_states`` is the model's final (normed) hidden state, equal to ``AutoModel``'s
    ``last_hidden_state``, so a causal LM and its bare decoder give the same embeddings.
    Texts are processed longest first to cut padding (as sentence-transformers does); the
    result is deterministic and, up to float rounding, independent of ``batch_size``.
    The model runs in eval mode (no dropout); its previous mode is restored.
    """
    hidden_size = int(model.config.hidden_size)
    if len(texts) == 0:
        return torch.empty(0, hidden_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = torch.empty(len(texts), hidden_size)  # [N, H]
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            outputs = model(**batch, output_hidden_states=True)
            hidden = outputs.hidden_states[-1]  # [B, T, H]
            pooled = mean_pool(hidden.float(), batch["attention_mask"])  # [B, H]
            out[rows] = nn.functional.normalize(pooled, p=2, dim=-1).cpu()
    finally:
        model.train(was_training)
    return out
