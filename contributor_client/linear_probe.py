"""The baselines an expert is measured against, and LP-FT's starting head.

A logistic regression on the frozen base model's pooled embeddings (the features the
classification head reads) is a few seconds of work; an expert that does not beat it, or the
majority class, is not worth routing to. :func:`probe_head` fits that probe on the training
split, reports its validation accuracy and, with ``probe_init`` (LP-FT, the default recipe),
makes it the head that fine-tuning starts from; with ``probe_refit`` it also fits the probe on
all examples, validation split included, which :func:`set_head` makes the final head when early
stopping keeps the probe (no tuned checkpoint beat it on validation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moerge.contributor_client.batching import collate, sorted_batches

if TYPE_CHECKING:
    from moerge.contributor_client.recipe import TrainConfig

#: the largest weight a probe-initialised head starts with (see :func:`fit_linear_probe`)
MAX_PROBE_WEIGHT = 100.0


def fit_linear_probe(
    features: torch.Tensor,
    targets: torch.Tensor,
    num_labels: int,
    c: float = 1.0,
    class_weights: torch.Tensor | None = None,
    max_iter: int = 200,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on ``features`` [N, H]: weight [L, H] and bias [L].

    Minimises ``sum_i w_{y_i} CE_i + ||W||^2 / (2c)`` (scikit-learn's objective with
    ``C = c``; the bias is not penalised) with L-BFGS on standardised features, in float64,
    then folds the standardisation back so that ``features @ weight.T + bias`` are the logits.
    """
    features = features.double()
    mean = features.mean(dim=0)  # [H]
    std = features.std(dim=0, unbiased=False)  # [H]
    # A (nearly) constant feature carries no signal, but dividing by its tiny spread would give
    # it an enormous weight once folded back: it is left out (its weight stays 0).
    flat = std < 1e-3 * std.max().clamp_min(1e-12)
    std = torch.where(flat, torch.ones_like(std), std)
    x = (features - mean) / std  # [N, H]
    x[:, flat] = 0.0
    n = len(x)
    weight = torch.zeros(num_labels, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    sample_weights = None if class_weights is None else class_weights.double()
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weight.T + bias  # [N, L]
        loss = F.cross_entropy(logits, targets, weight=sample_weights, reduction="sum")
        loss = (loss + weight.pow(2).sum() / (2 * c)) / n
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    folded = weight.detach() / std  # [L, H]
    bias_folded = bias.detach() - folded @ mean
    # Scaling weight and bias together keeps every argmax; it bounds the head a LoRA is then
    # tuned against (a nearly separable probe grows large weights, which fine-tuning at a LoRA
    # learning rate cannot move and the coordinator refuses above 1e4)
    scale = float(folded.abs().max()) / MAX_PROBE_WEIGHT
    if scale > 1.0:
        folded, bias_folded = folded / scale, bias_folded / scale
    return folded.float(), bias_folded.float()


@torch.inference_mode()
def pooled_features(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[Sequence[int]],
    indices: Sequence[int],
    batch_size: int,
    bf16: bool = False,
) -> torch.Tensor:
    """What ``model.classifier`` reads for each of ``indices`` [N, H], in eval mode.

    For BERT that is the pooler's output (``tanh`` of a dense layer on [CLS]); capturing the
    head's input with a hook works for any architecture whose head is one ``Linear``.
    """
    model.eval()
    captured: list[torch.Tensor] = []
    classifier = model.classifier
    assert isinstance(classifier, torch.nn.Module)  # a submodule, not a tensor attribute
    hook = classifier.register_forward_pre_hook(
        lambda _module, args: captured.append(args[0].float())
    )
    order: list[int] = []
    try:
        for rows in sorted_batches([len(token_ids[i]) for i in indices], batch_size):
            order.extend(rows)
            batch = collate([token_ids[indices[r]] for r in rows], tokenizer)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(**batch)
    finally:
        hook.remove()
    stacked = torch.cat(captured)  # [N, H], in `order`
    features = torch.empty_like(stacked)
    features[torch.tensor(order)] = stacked
    return features


@dataclass(frozen=True)
class ProbeFit:
    """What :func:`probe_head` fitted: the probe's validation accuracy and its all-data refit."""

    accuracy: float | None  # the training-split probe on the validation split (None: no split)
    # (weight [L, H], bias [L]) of the probe fitted on training + validation examples; None
    # without probe_init, probe_refit or a validation split
    refit: tuple[torch.Tensor, torch.Tensor] | None = None


def probe_head(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    config: TrainConfig,
    class_weights: torch.Tensor | None,
) -> ProbeFit:
    """Fit the linear probe; with ``probe_init`` it becomes the head. Its validation accuracy.

    Accuracy None (and the head left random) when the head is not one ``Linear`` named
    ``classifier``. With ``probe_init`` and ``probe_refit``, the probe is fitted a second time
    on all examples (same features, same class weights): once the validation split has chosen
    the probe over every tuned checkpoint, it no longer needs holding out (the probe the
    benchmarks compare with is fitted on all examples too).
    """
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Linear):
        return ProbeFit(None)
    chosen = list(train_idx) + list(val_idx)
    features = pooled_features(model, tokenizer, token_ids, chosen, config.batch_size, config.bf16)
    targets = torch.tensor([label_ids[i] for i in chosen])
    n = len(train_idx)
    weight, bias = fit_linear_probe(
        features[:n], targets[:n], head.out_features, config.probe_c, class_weights
    )
    if config.probe_init:
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        # The probe was fitted on features without dropout, and its weights are large where
        # the features vary little: dropout on the head's input would turn them into noise.
        dropout = getattr(model, "dropout", None)
        if isinstance(dropout, torch.nn.Dropout):
            dropout.p = 0.0
    if not val_idx:
        return ProbeFit(None)
    predicted = (features[n:] @ weight.T + bias).argmax(dim=-1)
    accuracy = float((predicted == targets[n:]).float().mean())
    refit = None
    if config.probe_init and config.probe_refit:
        refit = fit_linear_probe(
            features, targets, head.out_features, config.probe_c, class_weights
        )
    return ProbeFit(accuracy, refit)


def set_head(model: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy ``weight`` and ``bias`` into the trained classification head of a PEFT model.

    The head PEFT trains and saves is the ``modules_to_save`` copy of ``classifier``.
    """
    values = {"weight": weight, "bias": bias}
    copied = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "classifier" in name and "modules_to_save" in name and parameter.requires_grad:
                parameter.copy_(values[name.rsplit(".", 1)[-1]])
                copied += 1
    if copied != 2:
        raise ValueError(f"expected the head's weight and bias, found {copied} parameters")


def majority_class_accuracy(
    label_ids: Sequence[int], train_idx: Sequence[int], val_idx: Sequence[int]
) -> float | None:
    """Validation accuracy of always answering the most common training label."""
    if not val_idx:
        return None
    counts = torch.bincount(torch.tensor([label_ids[i] for i in train_idx]))
    majority = int(counts.argmax())
    return sum(label_ids[i] == majority for i in val_idx) / len(val_idx)
