"""One forward pass of the frozen base model, routed through the LoRA bank.

The bank (:class:`~.lora_bank.LoraBank`) adds the experts' deltas inside every adapted module.
Which experts a forward uses is set per batch by one of the bank's routing contexts:

* **rows** (``bank.route_examples``): row ``r`` of the batch uses the experts in bank slots
  ``slots[r]`` [R, n] with weights ``weights[r]`` [R, n], i.e. ``h = W x + sum_j w_j B_j A_j x``.
  An ensemble gives each row one expert with weight 1 (:meth:`Forward.one_expert_per_row`);
  a linear merge gives each row its k experts and their routing weights.
* **tokens** (``bank.route_tokens``, :meth:`Forward.token_routing`): a token-level router picks
  experts per token inside each adapted module; :class:`TokenUsage` adds up what it picked, per
  input, so that the response can say which experts served it.
* **none** (``bank.no_routing``): the base model alone (routing embeddings, the ``base`` router).

:class:`Forward` holds what every routed forward needs (model, bank, device and dtype of the slot
and weight tensors); the engine builds one and hands it to :mod:`.classify`, :mod:`.generate`
and :mod:`.merging`. Worker thread only, like everything the bank does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import BatchEncoding, PreTrainedModel

from moerge.coordinator.inference.cache import LoadedExpert, bank_module_name
from moerge.coordinator.inference.errors import InvalidPlan
from moerge.coordinator.inference.lora_bank import LoraBank
from moerge.coordinator.inference.results import ExpertWeight
from moerge.coordinator.inference.traced import TracedForwards
from moerge.router_training.base import Router


class Forward:
    """The frozen base model with its LoRA bank, routed per batch (see the module docstring)."""

    def __init__(
        self, model: PreTrainedModel, bank: LoraBank, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.bank = bank
        self.device = device
        self.dtype = dtype
        #: traced graphs of the classification forwards (the engine's ``traced_forwards``)
        self.traced: TracedForwards | None = None

    def slots(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Bank slots per row as a long tensor [R, n] on the engine's device."""
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    @contextmanager
    def one_expert_per_row(self, slots: torch.Tensor) -> Iterator[None]:
        """Row ``r`` uses the expert in ``slots[r]`` [R, 1] alone, with weight 1."""
        with self.bank.route_examples(slots, torch.ones_like(slots, dtype=self.dtype)):
            yield

    def pooled(self, enc: BatchEncoding) -> torch.Tensor:
        """The encoder's ``pooler_output`` [B, H] (classification), under the active routing."""
        return self.model(**enc).pooler_output

    def pooled_per_row(self, enc: BatchEncoding, slots: torch.Tensor) -> torch.Tensor:
        """``pooler_output`` [B, H] with row ``r`` through the expert in ``slots[r]`` [B, 1]
        alone: the traced graph where there is one (:mod:`.traced`), else the eager forward."""
        if self.traced is not None:
            pooled = self.traced.pooled_per_row(enc, slots)
            if pooled is not None:
                return pooled
        with self.one_expert_per_row(slots):
            return self.pooled(enc)

    def router_modules(self, router: Router) -> dict[str, str]:
        """Bank module name -> the token router's name for the same module."""
        bank_names = list(self.bank.modules)
        mapping = {}
        for name in router.modules:
            resolved = bank_module_name(bank_names, name)
            if resolved is not None:
                mapping[resolved] = name
        if not mapping:
            raise InvalidPlan(
                f"router '{router.method}' routes none of the engine's adapted modules "
                f"(router: {router.modules[:3]}..., engine: {bank_names[:3]}...)"
            )
        return mapping

    @contextmanager
    def token_routing(
        self,
        router: Router,
        top_k: int | None,
        attention_mask: torch.Tensor,
        experts: dict[str, LoadedExpert],
    ) -> Iterator[TokenUsage]:
        """Token-level routing through ``router`` for the forwards inside the block.

        ``attention_mask`` [B, T] is the prompt's; ``experts`` must hold every one of the
        router's experts (resident, pinned by the caller).
        """
        slot_table = self.slots([[experts[e].slot] for e in router.expert_ids]).flatten()  # [E]
        names = self.router_modules(router)  # bank module -> the router's name for it
        usage = TokenUsage(attention_mask, router.num_experts)

        def callback(module: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            n = hidden.shape[0]  # hidden [N, d_in]
            if module not in names:  # the router does not route here: base layer only
                none = torch.full((n, 1), -1, dtype=torch.long, device=hidden.device)
                return none, torch.zeros(n, 1, dtype=hidden.dtype, device=hidden.device)
            decision = router.route_tokens(names[module], hidden, top_k)
            usage.add(decision.to_dense(router.num_experts))
            return slot_table[decision.indices.to(slot_table.device)], decision.weights

        with self.bank.route_tokens(callback):
            yield usage


class TokenUsage:
    """Per input, the routing weight each expert received over non-padding tokens and modules."""

    def __init__(self, attention_mask: torch.Tensor, num_experts: int) -> None:
        self.mask = attention_mask.float()  # [B, T] of the first forward (the prompt)
        self.totals = self.mask.new_zeros(attention_mask.shape[0], num_experts)  # [B, E]

    def add(self, dense: torch.Tensor) -> None:
        """``dense`` [N, E] routing weights of one module call, N = B * T tokens."""
        batch, length = self.mask.shape
        dense = dense.to(self.totals)
        if dense.shape[0] == batch * length:
            dense = dense.view(batch, length, -1) * self.mask.unsqueeze(-1)
        elif dense.shape[0] % batch == 0:  # a decoding step: every new token is real
            dense = dense.view(batch, dense.shape[0] // batch, -1)
        else:
            return
        self.totals += dense.sum(dim=1)

    def mean_weights(self, b: int) -> torch.Tensor:
        """Expert weights of input ``b`` averaged over its tokens and modules: [E], sums to 1."""
        row = self.totals[b].cpu()
        total = row.sum()
        return row / total if total > 0 else row


def used_experts(expert_ids: Sequence[str], mean: torch.Tensor) -> tuple[ExpertWeight, ...]:
    """The experts with a positive ``mean`` weight [E] (:meth:`TokenUsage.mean_weights`),
    heaviest first."""
    order = torch.argsort(mean, descending=True).tolist()
    return tuple(ExpertWeight(expert_ids[i], float(mean[i])) for i in order if mean[i] > 0)


def repeat_rows(enc: BatchEncoding, k: int) -> BatchEncoding:
    """Each row ``k`` times, input-major: rows ``b*k .. b*k+k-1`` are copies of input b."""
    if k == 1:
        return enc
    return BatchEncoding({key: value.repeat_interleave(k, dim=0) for key, value in enc.items()})
