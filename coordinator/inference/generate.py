"""Unary generation: greedy decoding of a whole batch with routed experts (causal LM).

``InferenceEngine.predict`` and ``generate`` answer once the batch is done; streamed generation
with continuous batching is :mod:`.generation`. Routing is decided on the prompt. Prompts are
left-padded and decoded with HF ``generate`` (greedy, ``num_beams=1``). Per aggregation:

* ``ensemble`` with k > 1: the batch expanded k times (row ``b*k+j`` uses expert j of input b);
  at each step :class:`~.aggregation.EnsembleLogitsProcessor` replaces every row's scores by the
  log of the weighted mixture of the k next-token distributions, ``log sum_j w_j p_j``, so the
  k rows of an input pick the same token. One expert (k = 1) is a linear "merge" of one.
* ``merge_*``: each input's merged adapter (:mod:`.merging`); ``module_mix``: token-level
  routing inside every adapted module; the ``base`` router (k = 0): the base model alone.

An answer's ``confidence`` is the geometric mean of its tokens' probabilities, EOS included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchEncoding, GenerationMixin, PreTrainedTokenizerBase

from moerge.coordinator.inference.aggregation import EnsembleLogitsProcessor
from moerge.coordinator.inference.cache import ExpertCache
from moerge.coordinator.inference.forward import Forward, TokenUsage, repeat_rows, used_experts
from moerge.coordinator.inference.merging import MergedSlots
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan
from moerge.coordinator.inference.results import ExamplePrediction, ExpertWeight, expert_weights


@dataclass(frozen=True)
class AppliedPlan:
    """What the caller of :func:`applied_plan` needs while the plan is applied."""

    k: int = 1  # rows per input: k of an ensemble of k > 1 (rows expanded), else 1
    usage: TokenUsage | None = None  # the token router's usage under module mixing


@contextmanager
def applied_plan(
    forward: Forward,
    cache: ExpertCache,
    merges: MergedSlots,
    plan: RoutingPlan,
    attention_mask: torch.Tensor,
) -> Iterator[AppliedPlan]:
    """The model with ``plan`` applied to a batch whose attention mask is ``attention_mask``
    [B, T], for generation and for scoring given answers (:mod:`.answer_scoring`).

    Yields the rows per input: an ensemble of k > 1 experts wants the batch expanded k times
    (row ``b*k+j`` uses expert j of input b, :func:`~.forward.repeat_rows`) and its outputs
    mixed by the caller; every other plan runs the batch as it is.
    """
    aggregation = plan.aggregation or Aggregation.ENSEMBLE
    if aggregation is Aggregation.MODULE_MIX:
        router = plan.router
        assert router is not None
        with (
            cache.acquire(router.expert_ids) as loaded,
            forward.token_routing(router, plan.top_k, attention_mask, loaded) as usage,
        ):
            yield AppliedPlan(usage=usage)
        return
    if plan.k == 0:
        with forward.bank.no_routing():
            yield AppliedPlan()
        return
    rows = plan.expert_rows()
    with cache.acquire(plan.distinct_experts()) as loaded:
        if aggregation is Aggregation.ENSEMBLE and plan.k > 1:
            slots = forward.slots([[loaded[e].slot] for ids, _ in rows for e in ids])
            with forward.one_expert_per_row(slots):  # [B * k, 1]
                yield AppliedPlan(k=plan.k)
            return
        method = "linear" if aggregation is Aggregation.ENSEMBLE else aggregation.merge_method
        with merges.routing(rows, method, plan.merge, loaded):
            yield AppliedPlan()


class Generator:
    """Greedy answers of a causal-LM engine for one encoded batch and its resolved plan."""

    def __init__(
        self,
        forward: Forward,
        cache: ExpertCache,
        merges: MergedSlots,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        self.forward = forward
        self.cache = cache
        self.merges = merges
        self.tokenizer = tokenizer

    def __call__(
        self, enc: BatchEncoding, plan: RoutingPlan, max_new_tokens: int
    ) -> list[ExamplePrediction]:
        """One answer per row of ``enc`` [B, T] (left-padded prompts), at most
        ``max_new_tokens`` tokens each."""
        model = self.forward.model
        # a causal LM (AutoModelForCausalLM's classes generate; PreTrainedModel itself does not)
        assert isinstance(model, GenerationMixin)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "num_beams": 1,
            "pad_token_id": self.tokenizer.pad_token_id,
            "return_dict_in_generate": True,
            "output_scores": True,
        }
        batch = int(enc["input_ids"].shape[0])
        prompt_length = int(enc["input_ids"].shape[1])
        aggregation = plan.aggregation or Aggregation.ENSEMBLE
        mask = enc["attention_mask"]
        with applied_plan(self.forward, self.cache, self.merges, plan, mask) as applied:
            k, usage = applied.k, applied.usage
            if k > 1:  # an ensemble of k: the rows expanded, the next tokens mixed
                assert plan.weights is not None  # k > 1: an explicit plan's [B, k] weights
                processor = EnsembleLogitsProcessor(plan.weights.to(self.forward.device))
                out = model.generate(**repeat_rows(enc, k), logits_processor=[processor], **kwargs)
            else:
                out = model.generate(**enc, **kwargs)
        if usage is not None:  # module_mix: the experts each answer used, from the routing
            router = plan.router
            assert router is not None
            experts = [used_experts(router.expert_ids, usage.mean_weights(b)) for b in range(batch)]
        else:
            experts = [expert_weights(ids, w) for ids, w in plan.expert_rows()]
        return self._texts(out, batch, k, prompt_length, experts, aggregation)

    def _texts(
        self,
        out: Any,
        batch: int,
        k: int,
        prompt_length: int,
        experts: list[tuple[ExpertWeight, ...]],
        aggregation: Aggregation,
    ) -> list[ExamplePrediction]:
        """Decode the first of each input's ``k`` rows; confidence = geometric mean token prob."""
        sequences = out.sequences[::k, prompt_length:]  # [B, new]
        logprobs = torch.stack(
            [torch.log_softmax(s.float(), dim=-1)[::k] for s in out.scores], dim=1
        )  # [B, new, V]
        chosen = logprobs.gather(-1, sequences[:, : logprobs.shape[1]].unsqueeze(-1))[..., 0]
        eos = self.tokenizer.eos_token_id
        predictions = []
        for b in range(batch):
            tokens = sequences[b].tolist()
            n = len(tokens)
            if eos is not None and eos in tokens:
                n = tokens.index(eos) + 1  # count the EOS, nothing after it
            mean = float(chosen[b, :n].mean()) if n else 0.0
            text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
            assert isinstance(text, str)  # one sequence of ids decodes to one string
            predictions.append(
                ExamplePrediction(
                    output=text,
                    confidence=float(torch.tensor(mean).exp()),
                    experts=experts[b],
                    aggregation=aggregation.value,
                )
            )
        return predictions
