"""Few-shot composition: the merge weights of existing experts that fit a handful of examples.

LoraHub (Huang et al., 2023) composes a new task's adapter as a weighted sum of existing LoRA
modules, ``Delta W = sum_j w_j B_j A_j``, and finds ``w`` [E] with a gradient-free optimiser on
a few labelled examples of the task, minimising

    objective(w) = loss(w) + l1 * mean_j |w_j|

where ``loss`` is the merged model's mean cross-entropy on the examples and the L1 term (0.05 in
the paper) keeps the mixture sparse. Weights are bounded (LoraHub: [-1.5, 1.5]) and may be
negative (subtracting an expert's direction). The search is an ask-and-tell loop over a
nevergrad optimiser, as in LoraHub's code.

Three choices differ from the paper, all to stay safe on a live service:

* the default optimiser is nevergrad's ``CMA`` (the ``cma`` package's CMA-ES), not ``NGOpt``:
  in nevergrad 1.0.12 ``NGOpt`` picks a metamodel for some budgets and sizes (e.g. 200
  evaluations over 2 experts) that fails with a ``TypeError`` under current NumPy, so it is
  not offered;

* the search **starts from the uniform merge** (``w_j = 1 / E``) rather than from zero, so the
  returned weights never fit the examples worse than the uniform merge did;
* it stops at ``budget`` objective evaluations **or** after ``time_limit_s``, whichever comes
  first, and reports progress after every evaluation (the coordinator streams it to the caller).

This module knows nothing of models or networks: the caller passes ``objective`` (merged model
-> loss on the examples), so the search is testable on any function. The coordinator builds the
objective from its inference engine (:mod:`moerge.coordinator.compositions`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: nevergrad optimisers that may be asked for (see the module docstring for NGOpt).
OPTIMIZERS = ("CMA", "OnePlusOne", "TwoPointsDE", "RandomSearch")
MAX_EXAMPLES = 100
MAX_BUDGET = 1000


@dataclass(frozen=True)
class CompositionConfig:
    """How the weights are searched; every field has LoraHub's value unless said otherwise."""

    budget: int = 40  # objective evaluations at most (LoraHub: max_inference_step = 40)
    time_limit_s: float = 120.0  # wall-clock bound of the search (not in the paper)
    l1: float = 0.05  # weight of the L1 penalty mean_j |w_j|
    bound: float = 1.5  # each weight lies in [-bound, bound]
    optimizer: str = "CMA"  # a name from OPTIMIZERS (LoraHub: NGOpt, see above)
    seed: int = 0  # seeds the optimiser: same examples and seed, same weights

    def validate(self) -> None:
        """Refuse a search budget, time limit, L1 weight or weight bound out of range (they come
        from an RPC)."""
        if not 1 <= self.budget <= MAX_BUDGET:
            raise ValueError(f"budget must be in 1..{MAX_BUDGET} evaluations, got {self.budget}")
        if not (math.isfinite(self.time_limit_s) and 0 < self.time_limit_s <= 3600):
            raise ValueError(f"time_limit_s must be in (0, 3600], got {self.time_limit_s}")
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise ValueError(f"l1 must be a finite number >= 0, got {self.l1}")
        if not (math.isfinite(self.bound) and 0 < self.bound <= 10):
            raise ValueError(f"bound must be in (0, 10], got {self.bound}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}"
            )


@dataclass(frozen=True)
class SearchProgress:
    """The state after ``evaluations`` objective calls; ``best_*`` is the best point so far."""

    evaluations: int
    budget: int
    best_objective: float
    best_loss: float
    best_weights: tuple[float, ...]
    elapsed_s: float


@dataclass(frozen=True)
class SearchResult:
    """The weights found: ``loss`` without and ``objective`` with the L1 penalty.

    ``start_loss`` is the loss of the uniform merge the search started from; ``stopped_by`` is
    ``"budget"``, ``"time"`` or ``"cancelled"``.
    """

    weights: tuple[float, ...]
    loss: float
    objective: float
    start_loss: float
    evaluations: int
    elapsed_s: float
    stopped_by: str


def l1_penalty(weights: np.ndarray, l1: float) -> float:
    """LoraHub's regulariser: ``l1 * mean_j |w_j|``."""
    return float(l1 * np.abs(weights).mean())


def _quiet_cma_injections() -> None:
    """Silence CMA-ES's ``InjectionWarning`` ("orphanated injected solution ... could be a bug in
    the calling order"). nevergrad tells CMA the suggested uniform start, which CMA did not
    sample itself; CMA evaluates it like any point but warned twice for each search, in the
    coordinator's log for every composition request. Checked on every search: something that
    restores the warning filters (a test harness) may have removed it."""
    from cma.evolution_strategy import InjectionWarning

    if not any(f[0] == "ignore" and f[2] is InjectionWarning for f in warnings.filters):
        warnings.filterwarnings("ignore", category=InjectionWarning)


def search_weights(
    loss: Callable[[np.ndarray], float],
    num_experts: int,
    config: CompositionConfig,
    on_progress: Callable[[SearchProgress], object] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> SearchResult:
    """Minimise ``loss(w) + l1 * mean|w|`` over ``w`` [num_experts] in [-bound, bound].

    ``loss`` maps a weight vector to the merged model's loss on the examples (lower is better;
    a non-finite value counts as +inf). The first evaluation is the uniform merge. Stops after
    ``config.budget`` evaluations, ``config.time_limit_s`` seconds, or when ``cancelled()``.
    """
    import nevergrad as ng

    _quiet_cma_injections()
    config.validate()
    if num_experts < 1:
        raise ValueError("a composition needs at least one expert")
    started = time.monotonic()
    start = np.full(num_experts, 1.0 / num_experts)
    parametrization = ng.p.Array(init=start, lower=-config.bound, upper=config.bound)
    parametrization.random_state = np.random.RandomState(config.seed)
    optimizer = ng.optimizers.registry[config.optimizer](
        parametrization=parametrization, budget=config.budget
    )
    optimizer.suggest(start)  # the first point asked is the uniform merge
    best: tuple[float, float, np.ndarray] = (math.inf, math.inf, start)
    start_loss = math.inf
    stopped_by = "budget"
    for evaluation in range(1, config.budget + 1):
        if cancelled is not None and cancelled():
            stopped_by = "cancelled"
            break
        if evaluation > 1 and time.monotonic() - started >= config.time_limit_s:
            stopped_by = "time"
            break
        candidate = optimizer.ask()
        weights = np.asarray(candidate.value, dtype=np.float64)
        value = float(loss(weights))
        if not math.isfinite(value):
            value = math.inf
        if evaluation == 1:
            start_loss = value
        total = value + l1_penalty(weights, config.l1)
        optimizer.tell(candidate, total if math.isfinite(total) else 1e6)
        if total < best[0]:
            best = (total, value, weights.copy())
        if on_progress is not None:
            on_progress(
                SearchProgress(
                    evaluations=evaluation,
                    budget=config.budget,
                    best_objective=best[0],
                    best_loss=best[1],
                    best_weights=tuple(float(w) for w in best[2]),
                    elapsed_s=time.monotonic() - started,
                )
            )
    evaluations = evaluation if stopped_by == "budget" else evaluation - 1
    return SearchResult(
        weights=tuple(float(w) for w in best[2]),
        loss=best[1],
        objective=best[0],
        start_loss=start_loss,
        evaluations=evaluations,
        elapsed_s=time.monotonic() - started,
        stopped_by=stopped_by,
    )


def cross_entropy(
    probabilities: Sequence[Sequence[float]],
    label_names: Sequence[Sequence[str]],
    gold: Sequence[str],
) -> float:
    """Mean ``-log p(gold label)`` over examples (LoraHub's loss for classification).

    ``probabilities[i]`` is example i's distribution over ``label_names[i]``. A gold label the
    distribution does not name counts as probability 0; probabilities are clamped at 1e-12 so
    one confident mistake costs about 27.6 nats, not infinity.
    """
    if not gold:
        raise ValueError("no examples")
    total = 0.0
    for probs, names, label in zip(probabilities, label_names, gold, strict=True):
        p = float(probs[list(names).index(label)]) if label in names else 0.0
        total -= math.log(max(p, 1e-12))
    return total / len(gold)


def check_examples(texts: Sequence[str], labels: Sequence[str]) -> None:
    """The examples of a composition request: 1..MAX_EXAMPLES labelled texts."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if not 1 <= len(texts) <= MAX_EXAMPLES:
        raise ValueError(f"send 1..{MAX_EXAMPLES} labelled examples, got {len(texts)}")
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        if not text.strip():
            raise ValueError(f"example {i} has an empty text")
        if not label.strip():
            raise ValueError(f"example {i} has an empty label")
