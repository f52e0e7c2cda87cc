"""The loss a few-shot composition search minimises, computed by the inference engine.

:func:`moerge.router_training.composition.search_weights` needs ``loss(w)``: the merged model's
mean cross-entropy on the user's examples. Here ``w`` [E] becomes a *signed* ``merge_linear``
plan (every example gets ``sum_j w_j B_j A_j`` and the heads merged with the same weights,
exactly as Predict serves the stored composition), and the engine runs it on its own worker.
The benchmark (``benchmarks/generalization.py``) calls the same function, so what it measures is
what the coordinator stores.

For a causal LM the loss is LoraHub's: the mean over the examples of each answer's negative
log-likelihood per token after its prompt (:mod:`.answer_scoring`), so that every change of the
weights moves it. (Until 2026-12-07 it was ``1 - exact match`` of the greedy answers, which
takes only k + 1 values; ``benchmarks/generalization_llm.py`` measured both.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from moerge.coordinator.inference.engine import InferenceEngine
from moerge.coordinator.inference.plan import Aggregation, RoutingPlan
from moerge.router_training.composition import cross_entropy


def composition_plan(
    expert_ids: Sequence[str], weights: Iterable[float], batch: int
) -> RoutingPlan:
    """The plan serving a composition to ``batch`` inputs: the same signed weights per input."""
    return RoutingPlan.explicit(
        [list(expert_ids)] * batch,
        [[float(w) for w in weights]] * batch,
        Aggregation.MERGE_LINEAR,
        signed=True,
    )


def classification_loss(
    engine: InferenceEngine,
    expert_ids: Sequence[str],
    texts: Sequence[str],
    labels: Sequence[str],
) -> Callable[[np.ndarray], float]:
    """``w`` [E] -> mean cross-entropy of the signed linear merge on (``texts``, ``labels``)."""
    texts, labels = list(texts), list(labels)

    def loss(weights: np.ndarray) -> float:
        predictions = engine.predict(texts, composition_plan(expert_ids, weights, len(texts)))
        return cross_entropy(
            [p.probabilities for p in predictions], [p.labels for p in predictions], labels
        )

    return loss


def generation_loss(
    engine: InferenceEngine,
    expert_ids: Sequence[str],
    prompts: Sequence[str],
    answers: Sequence[str],
) -> Callable[[np.ndarray], float]:
    """``w`` [E] -> mean negative log-likelihood per token of ``answers`` under the merge."""
    prompts, answers = list(prompts), list(answers)

    def loss(weights: np.ndarray) -> float:
        plan = composition_plan(expert_ids, weights, len(prompts))
        losses = engine.answer_losses(prompts, answers, plan)
        return sum(losses) / len(losses)

    return loss


def accuracy(
    engine: InferenceEngine,
    expert_ids: Sequence[str],
    weights: Sequence[float],
    texts: Sequence[str],
    labels: Sequence[str],
) -> float:
    """Share of ``texts`` whose composed prediction is the gold label."""
    predictions = engine.predict(list(texts), composition_plan(expert_ids, weights, len(texts)))
    return sum(p.output == y for p, y in zip(predictions, labels, strict=True)) / len(labels)
