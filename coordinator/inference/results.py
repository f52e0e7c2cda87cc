"""What the engine returns per input, independent of how the experts were combined.

Mirrors ``moerge.v1.Prediction`` field by field so the servicer copies values without logic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExpertWeight:
    """One chosen expert and its routing weight for the input (token-level: mean weight)."""

    expert_id: str
    weight: float


def expert_weights(ids: Sequence[str], weights: Sequence[float]) -> tuple[ExpertWeight, ...]:
    """``ids`` [k] paired with their ``weights`` [k]."""
    return tuple(ExpertWeight(e, float(w)) for e, w in zip(ids, weights, strict=True))


@dataclass(frozen=True)
class ExpertOutput:
    """One chosen expert's own output for the input.

    Classification: the expert's full distribution over its own labels (``labels`` in head
    order, ``probabilities`` summing to 1). Generation: ``text`` (empty when not computed).
    """

    expert_id: str
    labels: tuple[str, ...] = ()
    probabilities: tuple[float, ...] = ()
    text: str = ""


@dataclass(frozen=True)
class ExamplePrediction:
    """The routed prediction for one input.

    ``output`` is the predicted label or the generated text; ``confidence`` the probability of
    that label (generation: the geometric mean of the chosen tokens' probabilities).
    ``labels``/``probabilities`` hold the combined distribution whenever one exists (empty when
    chosen experts' label sets differ under ensembling). ``latency_ms`` is the wall time of the
    engine call that produced this prediction (shared by every input of that call).
    """

    output: str
    confidence: float
    experts: tuple[ExpertWeight, ...]
    expert_outputs: tuple[ExpertOutput, ...] = ()
    labels: tuple[str, ...] = ()
    probabilities: tuple[float, ...] = ()
    latency_ms: float = 0.0
    aggregation: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
