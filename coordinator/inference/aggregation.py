"""How the chosen experts' contributions are combined: output ensembling and parameter merging.

**Output ensembling** (classification). Each chosen expert produces its full distribution over
its own labels; all of them are always returned. The combined prediction follows one rule:

* if every chosen expert has the *same label set* (names compared as sets; heads are aligned
  to the first expert's label order), the prediction is the argmax of the routing-weighted
  average of their distributions and the confidence is that average's probability;
* otherwise the experts answer different questions and averaging is meaningless: the output is
  the label of the highest-weight expert (first in routing order on ties) with that expert's
  probability as confidence, and no combined distribution is reported.

**Output ensembling** (generation): :class:`EnsembleLogitsProcessor` replaces each step's
next-token scores by the log of the routing-weighted average of the experts' next-token
distributions, so greedy decoding picks one shared token per input.

**Parameter merging** (``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``,
``linear``): :func:`merge_lora_factors` is PEFT's ``add_weighted_adapter`` for non-SVD
combination types applied to one input's experts: each expert's ``lora_A`` and ``lora_B`` are
weighted by ``sqrt(w_j * scaling_j)`` and merged *separately* with ``peft.utils.merge_utils``,
giving one rank-r adapter that fits a bank slot exactly. Experts of different rank are
zero-padded to the largest rank. (The engine serves ``linear`` merging exactly through the bank's
routing, ``sum_j w_j scaling_j B_j A_j``, instead of PEFT's approximate factor-wise ``linear``.)
Heads are merged with the same function when all label sets agree; otherwise the
highest-weight expert's head is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from peft.utils import merge_utils
from transformers import LogitsProcessor

from moerge.coordinator.inference.heads import ClassificationHead
from moerge.coordinator.inference.results import ExpertOutput
from moerge.refusals import FailedPrecondition

LoraFactors = tuple[torch.Tensor, torch.Tensor, float]  # A [r, d_in], B [d_out, r], scaling

MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


# -- label sets --------------------------------------------------------------------------------
def shared_labels(heads: Sequence[ClassificationHead]) -> tuple[str, ...] | None:
    """The first head's label order if every head has the same label set, else ``None``."""
    first = heads[0].label_names
    reference = set(first)
    if all(len(h.label_names) == len(first) and set(h.label_names) == reference for h in heads):
        return first
    return None


def top_index(weights: Sequence[float]) -> int:
    """Position of the highest weight (first one on ties)."""
    return max(range(len(weights)), key=lambda j: (weights[j], -j))


# -- output ensembling -------------------------------------------------------------------------
class Ensembled(NamedTuple):
    """One input's combined prediction; ``expert_ids``/``weights`` are the experts that took
    part (renormalised when one was dropped) and ``notes`` says why any was dropped."""

    label: str
    confidence: float
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]
    expert_outputs: tuple[ExpertOutput, ...]
    expert_ids: tuple[str, ...]
    weights: tuple[float, ...]
    notes: tuple[str, ...]


def ensemble_distributions(
    expert_ids: Sequence[str],
    weights: Sequence[float],
    distributions: Sequence[Sequence[float]],
    heads: Sequence[ClassificationHead],
) -> Ensembled:
    """Combine one input's per-expert distributions by the rule in the module docstring.

    ``distributions[j]`` is expert ``j``'s probability vector in its head's label order.
    ``labels`` and ``probabilities`` are empty when the label sets differ. An expert whose
    distribution holds NaN or Inf has failed for this input: it is dropped, the others'
    weights are renormalised to the original total, and a note names it (one expert's
    overflow must not turn everyone's answer into NaN). If every expert failed,
    ``FailedPrecondition`` is raised.
    """
    finite = [all(math.isfinite(float(p)) for p in dist) for dist in distributions]
    notes: tuple[str, ...] = ()
    if not all(finite):
        dropped = [e for e, ok in zip(expert_ids, finite, strict=True) if not ok]
        if not any(finite):
            raise FailedPrecondition(
                f"every chosen expert's output was NaN or Inf ({', '.join(dropped)})"
            )
        total = sum(float(w) for w in weights)
        kept_total = sum(float(w) for w, ok in zip(weights, finite, strict=True) if ok)
        scale = total / kept_total if kept_total > 0 else 0.0
        keep = [j for j, ok in enumerate(finite) if ok]
        expert_ids = [expert_ids[j] for j in keep]
        weights = [float(weights[j]) * scale if scale else 1.0 / len(keep) for j in keep]
        distributions = [distributions[j] for j in keep]
        heads = [heads[j] for j in keep]
        notes = (f"dropped expert(s) {', '.join(dropped)}: output was NaN or Inf",)
    outputs = tuple(
        ExpertOutput(e, h.label_names, tuple(float(p) for p in dist))
        for e, h, dist in zip(expert_ids, heads, distributions, strict=True)
    )
    ids, kept_weights = tuple(expert_ids), tuple(float(w) for w in weights)
    labels = shared_labels(heads)
    if labels is None:
        j = top_index(weights)
        dist = distributions[j]
        best = max(range(len(dist)), key=lambda i: dist[i])
        label = heads[j].label_names[best]
        return Ensembled(label, float(dist[best]), (), (), outputs, ids, kept_weights, notes)
    combined = [0.0] * len(labels)
    for w, head, dist in zip(weights, heads, distributions, strict=True):
        position = {name: i for i, name in enumerate(head.label_names)}
        for i, name in enumerate(labels):
            combined[i] += float(w) * float(dist[position[name]])
    best = max(range(len(combined)), key=lambda i: combined[i])
    return Ensembled(
        labels[best], combined[best], labels, tuple(combined), outputs, ids, kept_weights, notes
    )


class EnsembleLogitsProcessor(LogitsProcessor):
    """Mix next-token distributions of ``k`` expanded rows per input (greedy ensembling).

    Rows are ordered input-major (``row = b * k + j``); ``weights`` [B, k]. Every row of an input
    gets the same scores ``log(sum_j w_j softmax(scores_j))``, so all copies stay in lockstep.
    """

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights  # [B, k]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Mix the k rows of each request into one next-token distribution (weighted probabilities),
        returned as log-probabilities on every one of its rows so they all pick the same token."""
        batch, k = self.weights.shape
        probs = torch.softmax(scores.float(), dim=-1).view(batch, k, -1)  # [B, k, V]
        w = self.weights.to(probs.device).unsqueeze(-1)  # [B, k, 1]
        mixed = (probs * w).sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # [B, V]
        # transformers annotates processors as returning FloatTensor, a subclass torch ops never
        # return; every processor of its own returns a plain float tensor like this one.
        return mixed.log().repeat_interleave(k, dim=0).to(scores.dtype)  # type: ignore[return-value]


# -- parameter merging -------------------------------------------------------------------------
def _merge(
    method: str,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"],
) -> torch.Tensor:
    if method == "linear":
        return merge_utils.task_arithmetic(tensors, weights)
    if method == "ties":
        return merge_utils.ties(tensors, weights, density, majority_sign_method)
    if method == "dare_linear":
        return merge_utils.dare_linear(tensors, weights, density)
    if method == "dare_ties":
        return merge_utils.dare_ties(tensors, weights, density, majority_sign_method)
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, weights, density)
    raise ValueError(f"unknown merge method {method!r} (known: {', '.join(MERGE_METHODS)})")


def merge_lora_factors(
    factors: Sequence[LoraFactors],
    weights: Sequence[float],
    method: str,
    density: float = 0.5,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> LoraFactors:
    """Merge one module's LoRA factors of k experts into one adapter (PEFT semantics).

    ``factors[j]`` = (A_j [r_j, d_in], B_j [d_out, r_j], scaling_j). Returns
    (A [r, d_in], B [d_out, r], 1.0) with ``r = max r_j``; the scaling is folded into the
    factors as PEFT does. DARE draws from torch's global RNG: seed it around the call.
    """
    rank = max(a.shape[0] for a, _, _ in factors)
    a_list, b_list, w_a, w_b = [], [], [], []
    for (a, b, scaling), w in zip(factors, weights, strict=True):
        a, b = a.float(), b.float()
        if a.shape[0] < rank:  # zero-pad to the common rank
            a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
        scaled = float(w) * float(scaling)
        sign = 1.0 if scaled >= 0 else -1.0
        w_a.append(math.sqrt(abs(scaled)) * sign)
        w_b.append(math.sqrt(abs(scaled)))
        a_list.append(a)
        b_list.append(b)
    device = a_list[0].device
    merged_a = _merge(
        method, a_list, torch.tensor(w_a, device=device), density, majority_sign_method
    )
    merged_b = _merge(
        method, b_list, torch.tensor(w_b, device=device), density, majority_sign_method
    )
    return merged_a.contiguous(), merged_b.contiguous(), 1.0


def merge_heads(
    heads: Sequence[ClassificationHead],
    weights: Sequence[float],
    method: str,
    density: float = 0.5,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> ClassificationHead:
    """Merge heads with the same rule as the adapters, or pick the top expert's head.

    With equal label sets (aligned to the first head's order) weight and bias are merged by
    ``method`` with the routing weights; otherwise the highest-weight expert's head is returned.
    """
    labels = shared_labels(heads)
    if labels is None:
        return heads[top_index(weights)]
    if len(heads) == 1 and method == "linear":
        return heads[0]
    aligned = [h.aligned_to(labels) for h in heads]
    w = torch.tensor([float(x) for x in weights])
    weight = _merge(
        method,
        [h.weight for h in aligned],
        w.to(aligned[0].weight.device),
        density,
        majority_sign_method,
    )
    bias = _merge(
        method,
        [h.bias for h in aligned],
        w.to(aligned[0].bias.device),
        density,
        majority_sign_method,
    )
    return ClassificationHead(weight.contiguous(), bias.contiguous(), labels)
