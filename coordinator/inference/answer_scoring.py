"""How likely given answers are under a routing plan (causal LM): what a composition search scores.

LoraHub (Huang et al., 2023) searches a merge's weights on the cross-entropy of the few
examples' answers. Scoring greedy answers by exact match instead gives the search only k + 1
distinct values over k examples, so most of its steps see no difference between the mixtures
they try; the likelihood of the right answer moves with every weight.

Each (prompt, answer) pair is encoded exactly as contributors train on it
(:func:`moerge.contributor_client.batching.encode_completions`): the prompt with the model's
special tokens, then the answer's tokens and EOS. The batch is left-padded like the engine's
prompts, with position ids counted from each row's first real token, so every row scores as it
would alone; the LM head runs only over the last ``max_b n_b + 1`` positions. Per example b with
answer tokens ``x_t`` (EOS included, ``n_b`` of them):

    NLL_b = -(1 / n_b) sum_{t in answer_b} log p(x_t | x_<t)

in nats per token. Under an ensemble of k experts, ``p = sum_j w_j p_j`` per token: the mixture
that ensembled generation picks its tokens from (:class:`~.aggregation.EnsembleLogitsProcessor`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BatchEncoding

from moerge.contributor_client.batching import encode_completions
from moerge.coordinator.inference.forward import repeat_rows
from moerge.coordinator.inference.generate import Generator, applied_plan
from moerge.coordinator.inference.plan import RoutingPlan

#: No cut: the engine checks the prompts' lengths itself, and an answer is scored whole.
UNLIMITED = 1 << 30


class AnswerScorer:
    """Mean negative log-likelihood of each given answer after its prompt, under a plan."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator  # its model, tokenizer and means of applying a plan

    def __call__(
        self, prompts: Sequence[str], answers: Sequence[str], plan: RoutingPlan
    ) -> list[float]:
        """``NLL_b`` (nats per answer token, EOS included) of each pair; ``plan`` resolved."""
        g = self.generator
        ids, prompt_lengths = encode_completions(g.tokenizer, prompts, answers, UNLIMITED)
        device = g.forward.device
        batch, width = len(ids), max(len(row) for row in ids)
        input_ids = torch.full((batch, width), int(g.tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)  # [B, T]
        for b, row in enumerate(ids):
            input_ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[b, width - len(row) :] = 1
        position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # [B, T]: 0 at each row's start
        n_answer = torch.tensor([len(r) - p for r, p in zip(ids, prompt_lengths, strict=True)])
        keep = int(n_answer.max()) + 1  # logits at these last positions predict the answers
        enc = BatchEncoding(
            {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
        ).to(device)
        with applied_plan(g.forward, g.cache, g.merges, plan, enc["attention_mask"]) as a:
            out = g.forward.model(**repeat_rows(enc, a.k), logits_to_keep=keep, use_cache=False)
            k = a.k
        logprobs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # [B*k, keep-1, V]
        targets = input_ids[:, width - keep + 1 :].to(device)  # [B, keep-1]
        token_lp = logprobs.gather(-1, targets.repeat_interleave(k, dim=0).unsqueeze(-1))[..., 0]
        if k > 1:  # log sum_j w_j p_j, per token: [B, k, keep-1] -> [B, keep-1]
            assert plan.weights is not None  # an ensemble of k > 1 has explicit [B, k] weights
            log_w = plan.weights.to(device).float().clamp(min=1e-30).log()  # [B, k]
            token_lp = torch.logsumexp(token_lp.view(batch, k, -1) + log_w[..., None], dim=1)
        step = torch.arange(keep - 1, device=device)  # [keep-1]
        counts = n_answer.to(device)
        in_answer = step[None, :] >= (keep - 1 - counts)[:, None]  # [B, keep-1]
        # where, not a product: a padded position's score may be NaN (it attends to nothing)
        nll = -torch.where(in_answer, token_lp, 0.0).sum(dim=1) / counts  # [B]
        return [float(v) for v in nll]
