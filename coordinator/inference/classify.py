"""Classification: the encoder's pooled output through the experts' heads, combined per plan.

An expert's head is applied to ``pooler_output`` [B, H] exactly as
``BertForSequenceClassification`` does in eval mode. Per aggregation of a resolved plan:

* ``ensemble``: each chosen expert runs on its input (expert j of input b on row ``b*k+j``) and
  the k distributions are combined by routing weight (:func:`~.aggregation.ensemble_distributions`).
  ``ensemble_mode="expand"`` runs one forward over the batch expanded k times (the default on
  GPUs); ``"sequential"`` runs k forwards of the batch (the default on CPU, where it measured
  faster); both give the same rows.
* ``merge_*``: one forward through each input's merged adapter (:mod:`.merging`); the heads are
  merged like the adapters, with the weights scaled to unit L1 norm (:func:`unit_l1`).
* ``module_mix``: one forward with token-level routing; the head is the one of the expert with
  the largest total routing weight over the input's tokens and modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from transformers import BatchEncoding

from moerge.coordinator.inference.aggregation import ensemble_distributions, merge_heads
from moerge.coordinator.inference.cache import ExpertCache, LoadedExpert
from moerge.coordinator.inference.errors import InvalidPlan
from moerge.coordinator.inference.forward import Forward, repeat_rows, used_experts
from moerge.coordinator.inference.heads import ClassificationHead
from moerge.coordinator.inference.merging import MergedSlots, combination_key, seeded
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan
from moerge.coordinator.inference.results import ExamplePrediction, expert_weights

EnsembleMode = Literal["expand", "sequential"]


class Classifier:
    """Predictions of a classification engine for one encoded batch and its resolved plan."""

    def __init__(self, forward: Forward, cache: ExpertCache, merges: MergedSlots) -> None:
        self.forward = forward
        self.cache = cache
        self.merges = merges

    def __call__(
        self, enc: BatchEncoding, plan: RoutingPlan, ensemble_mode: EnsembleMode
    ) -> list[ExamplePrediction]:
        """One prediction per row of ``enc`` (``plan`` resolved: explicit, or module_mix)."""
        if plan.aggregation is Aggregation.MODULE_MIX:
            return self._module_mix(enc, plan)
        if plan.k == 0:
            raise InvalidPlan("classification needs at least one expert (the base has no head)")
        with self.cache.acquire(plan.distinct_experts()) as experts:
            if plan.aggregation is Aggregation.ENSEMBLE:
                return self._ensemble(enc, plan, experts, ensemble_mode)
            return self._merged(enc, plan, experts)

    def _ensemble(
        self,
        enc: BatchEncoding,
        plan: RoutingPlan,
        experts: dict[str, LoadedExpert],
        ensemble_mode: EnsembleMode,
    ) -> list[ExamplePrediction]:
        forward = self.forward
        rows = plan.expert_rows()
        k = plan.k
        row_experts = [e for ids, _ in rows for e in ids]  # [B * k], input-major
        if k == 1 or ensemble_mode == "expand":
            slots = forward.slots([[experts[e].slot] for e in row_experts])  # [B * k, 1]
            pooled = forward.pooled_per_row(repeat_rows(enc, k), slots)  # [B * k, H]
        else:
            parts = []
            for j in range(k):
                slots = forward.slots([[experts[ids[j]].slot] for ids, _ in rows])  # [B, 1]
                parts.append(forward.pooled_per_row(enc, slots))  # [B, H]
            pooled = torch.stack(parts, dim=1).flatten(0, 1)  # [B * k, H]
        distributions = through_heads(pooled, [head_of(experts[e]) for e in row_experts])
        predictions = []
        for b, (ids, weights) in enumerate(rows):
            heads = [head_of(experts[e]) for e in ids]
            result = ensemble_distributions(ids, weights, distributions[b * k : (b + 1) * k], heads)
            predictions.append(
                ExamplePrediction(
                    output=result.label,
                    confidence=result.confidence,
                    experts=expert_weights(result.expert_ids, result.weights),
                    expert_outputs=result.expert_outputs,
                    labels=result.labels,
                    probabilities=result.probabilities,
                    aggregation=Aggregation.ENSEMBLE.value,
                    notes=result.notes,
                )
            )
        return predictions

    def _merged(
        self, enc: BatchEncoding, plan: RoutingPlan, experts: dict[str, LoadedExpert]
    ) -> list[ExamplePrediction]:
        rows = plan.expert_rows()
        assert plan.aggregation is not None
        method = plan.aggregation.merge_method
        with self.merges.routing(rows, method, plan.merge, experts):
            pooled = self.forward.pooled(enc)  # [B, H]
        # one head per distinct combination, merged like the adapters
        by_key: dict[tuple[object, ...], ClassificationHead] = {}
        heads = []
        for ids, weights in rows:
            key = combination_key(ids, weights)
            if key not in by_key:
                with seeded(plan.merge.seed, key, "head", self.forward.device):
                    by_key[key] = merge_heads(
                        [head_of(experts[e]) for e in ids],
                        unit_l1(weights),
                        method,
                        plan.merge.density,
                        plan.merge.majority_sign_method,
                    )
            heads.append(by_key[key])
        predictions = []
        for (ids, weights), head, probs in zip(
            rows, heads, through_heads(pooled, heads), strict=True
        ):
            best = max(range(len(probs)), key=probs.__getitem__)
            predictions.append(
                ExamplePrediction(
                    output=head.label_names[best],
                    confidence=probs[best],
                    experts=expert_weights(ids, weights),
                    labels=head.label_names,
                    probabilities=tuple(probs),
                    aggregation=plan.aggregation.value,
                )
            )
        return predictions

    def _module_mix(self, enc: BatchEncoding, plan: RoutingPlan) -> list[ExamplePrediction]:
        router = plan.router
        assert router is not None
        with self.cache.acquire(router.expert_ids) as experts:
            with self.forward.token_routing(
                router, plan.top_k, enc["attention_mask"], experts
            ) as usage:
                pooled = self.forward.pooled(enc)  # [B, H]
            means = [usage.mean_weights(b) for b in range(pooled.shape[0])]  # B x [E]
            tops = [router.expert_ids[int(torch.argmax(mean))] for mean in means]
            heads = [head_of(experts[top]) for top in tops]
            predictions = []
            for mean, top, head, probs in zip(
                means, tops, heads, through_heads(pooled, heads), strict=True
            ):
                best = max(range(len(probs)), key=probs.__getitem__)
                predictions.append(
                    ExamplePrediction(
                        output=head.label_names[best],
                        confidence=probs[best],
                        experts=used_experts(router.expert_ids, mean),
                        labels=head.label_names,
                        probabilities=tuple(probs),
                        aggregation=Aggregation.MODULE_MIX.value,
                        notes=(f"head of {top} (largest total routing weight)",),
                    )
                )
        return predictions


def through_heads(pooled: torch.Tensor, heads: list[ClassificationHead]) -> list[list[float]]:
    """Row ``b`` of ``pooled`` [B, H] through ``heads[b]`` -> B probability lists.

    One matmul per distinct head object and a single device-to-host copy.
    """
    groups: dict[int, list[int]] = {}
    for b, head in enumerate(heads):
        groups.setdefault(id(head), []).append(b)
    parts, layout = [], []
    for index in groups.values():
        head = heads[index[0]]
        rows = pooled[torch.tensor(index, device=pooled.device)]  # [n, H]
        parts.append(torch.softmax(head.logits(rows), dim=-1).flatten())  # [n * L]
        layout.append((index, head.num_labels))
    flat = torch.cat(parts).cpu().tolist()
    out: list[list[float]] = [[] for _ in heads]
    position = 0
    for index, labels in layout:
        for b in index:
            out[b] = flat[position : position + labels]
            position += labels
    return out


def unit_l1(weights: Sequence[float]) -> list[float]:
    """Head merge weights: ``w_j / sum_i |w_i|``.

    Routed weights already sum to 1, so this changes nothing for them. A few-shot composition's
    signed weights scale the LoRA deltas as given (LoraHub), but a head is a whole layer, not a
    delta: scaled with them, shrinking every weight towards 0 would shrink the logits towards a
    uniform answer, which the search would learn to prefer on confidently wrong experts.
    """
    total = sum(abs(float(w)) for w in weights)
    return [float(w) / total for w in weights] if total > 0 else [float(w) for w in weights]


def head_of(expert: LoadedExpert) -> ClassificationHead:
    """The expert's classification head; an expert without one cannot classify."""
    if expert.head is None:
        raise InvalidPlan(f"expert {expert.expert_id!r} has no classification head")
    return expert.head
