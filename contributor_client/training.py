"""Fine-tunes one LoRA expert on the contributor's local data with a plain PyTorch loop.

Classification experts are ``AutoModelForSequenceClassification`` + LoRA (PEFT ``SEQ_CLS``:
PEFT trains and saves the new ``classifier`` head through ``modules_to_save``); causal LM
experts are ``AutoModelForCausalLM`` + LoRA trained with the LM loss: on the whole text, or, when
each text comes with a completion (the data's label field), on the completion's tokens only
(instruction tuning: prompt -> answer). The result is PEFT's own
format, exactly ``adapter_config.json`` and ``adapter_model.safetensors``. For a BERT base such
as all-MiniLM-L6-v2 with the default targets the saved keys are::

    base_model.model.bert.encoder.layer.{i}.attention.self.{query,value}.lora_A.weight  [r, H]
    base_model.model.bert.encoder.layer.{i}.attention.self.{query,value}.lora_B.weight  [H, r]
    base_model.model.classifier.weight                                                  [L, H]
    base_model.model.classifier.bias                                                    [L]

(``L`` labels, in the order of ``TrainResult.label_names``). A causal LM adapter has only the
``lora_A``/``lora_B`` keys, e.g. ``base_model.model.model.layers.{i}.self_attn.q_proj...``.

The default classification recipe (docs/training.md) is LP-FT (Kumar et al. 2022): the head
starts as a logistic-regression linear probe fitted on the frozen pooled embeddings the head
reads, so tuning begins from the probe instead of from noise and does not distort the features
early on; then LoRA + head are tuned at a rate suited to LoRA (3e-3; the head's may be set
apart) with warm-up and linear (or cosine) decay, for at least
``min_steps`` optimizer steps (small data sets get enough updates), with a class-weighted loss,
and the best validation checkpoint is restored (early stopping). ``RECIPES["legacy"]`` gives
back the earlier recipe (random head, fixed epochs, unweighted loss, last step kept).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from moerge.contributor_client.batching import (
    IGNORE_INDEX,
    collate,
    encode,
    encode_completions,
    length_grouped_batches,
    load_tokenizer,
    sorted_batches,
)
from moerge.contributor_client.data import label_order, train_validation_split
from moerge.expert_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ExpertQuality

if TYPE_CHECKING:
    from moerge.contributor_client.dp_sgd import DPSGDConfig
    from moerge.contributor_client.privacy import SGDAccount

TASK_TYPES = ("classification", "causal_lm")
SCHEDULES = ("linear", "cosine")
CLASS_WEIGHTINGS = ("none", "sqrt", "balanced")

#: Named presets of :class:`TrainConfig` fields; "default" is the dataclass defaults.
RECIPES: dict[str, dict[str, object]] = {
    "default": {},
    # The default recipe before LP-FT: random head, fixed epochs, unweighted loss, last step kept.
    "legacy": {
        "learning_rate": 1e-3,
        "warmup_fraction": 0.06,
        "lr_schedule": "linear",
        "min_steps": 0,
        "probe_init": False,
        "class_weighting": "none",
        "early_stopping": False,
    },
}


@dataclass
class TrainConfig:
    """How to fine-tune one expert. Defaults suit all-MiniLM-L6-v2 classification on a CPU."""

    base_model: str  # local folder of the base model (nothing is ever downloaded)
    task_type: str = "classification"  # "classification" (LoRA + head) or "causal_lm"
    lora_rank: int = 8  # r of every LoRA module
    lora_alpha: float = 16  # LoRA scaling numerator: delta W = (alpha / r) * B A
    lora_dropout: float = 0.1  # dropout on the LoRA path's input while training
    # Modules to adapt; None = PEFT's default for the architecture ("query"/"value" for BERT,
    # "q_proj"/"v_proj" for Llama).
    target_modules: list[str] | None = None
    epochs: int = 3  # passes over the training split (at least; see min_steps)
    batch_size: int = 16  # examples per optimizer step
    # AdamW peak learning rate of the LoRA factors (warm-up, then lr_schedule decay). LoRA
    # needs rates well above full fine-tuning's (Hu et al. 2021: 4e-4..5e-4 for RoBERTa-base
    # at rank 8, over thousands of steps); with ~100 steps on a small encoder, 3e-3 beat 5e-4
    # by 1-5 points on the demo tasks (benchmarks/results/expert_quality.md).
    learning_rate: float = 3e-3
    # Peak learning rate of the classification head (None: learning_rate). LP-FT's head
    # starts at the probe's optimum, so it may move slower than the LoRA factors.
    head_learning_rate: float | None = None
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_fraction: float = 0.1  # share of the steps spent warming the learning rate up
    lr_schedule: str = "linear"  # decay after warm-up: "linear" or "cosine" (to zero)
    # Classification: at least this many optimizer steps, however few the examples (more
    # epochs if needed; causal LM training keeps to `epochs`): 200 examples at batch 16 are
    # only 36 steps in 3 epochs, too few for LoRA to move. At 3e-3, 60 steps did as well as
    # 100 on the 200-example screens, for 40% less time.
    min_steps: int = 60
    # LP-FT: start the classification head from a logistic regression fitted on the frozen
    # pooled embeddings the head reads (the head must be a Linear named "classifier").
    probe_init: bool = True
    probe_c: float = 1.0  # inverse L2 strength of the probe (scikit-learn's C)
    # Loss weight of class c: "balanced" n / (L n_c), "sqrt" its square root, "none" 1.
    class_weighting: str = "sqrt"
    # Evaluate on the validation split every eval_every steps (0: once per epoch) and restore
    # the best checkpoint (accuracy, then loss) at the end; stop after `patience` evaluations
    # without improvement. Needs validation_fraction > 0.
    early_stopping: bool = True
    eval_every: int = 0
    patience: int = 4
    max_length: int = 128  # tokens kept per example (longer texts are truncated)
    # Run forward passes under bfloat16 autocast (weights stay float32): about 2x faster on
    # long texts with CPUs that have AVX512-BF16 or AMX, slower on CPUs without them.
    bf16: bool = False
    seed: int = 0  # seeds the split, the initialisation, dropout and batch order
    validation_fraction: float = 0.1  # share of each label held out to report accuracy
    max_examples: int | None = None  # use a seeded random subset of this size (None: all)
    # Name recorded as ``base_model_name_or_path`` in adapter_config.json instead of the local
    # folder (e.g. "sentence-transformers/all-MiniLM-L6-v2"); "" records ``base_model``.
    base_model_id: str = ""
    progress_window: int = 20  # steps averaged in the progress bar's running loss

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        positive = {
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "progress_window": self.progress_window,
            "probe_c": self.probe_c,
            "patience": self.patience,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(
                f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {self.class_weighting!r}"
            )
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise ValueError(
                f"head_learning_rate must be positive, got {self.head_learning_rate!r}"
            )
        if self.min_steps < 0 or self.eval_every < 0:
            raise ValueError("min_steps and eval_every must be non-negative")
        if self.max_examples is not None and self.max_examples < 2:
            raise ValueError(f"max_examples must be at least 2, got {self.max_examples}")


@dataclass
class TrainResult:
    """What training reports back (nothing here is per-example)."""

    label_names: list[str]  # head output i predicts label_names[i]; [] for causal LM
    train_loss_curve: list[float]  # training loss of every optimizer step
    val_accuracy: float | None  # held-out accuracy (next-token accuracy for causal LM)
    val_count: int  # held-out examples behind val_accuracy (0: none held out)
    seconds: float  # wall time of the whole call
    train_count: int = 0  # examples trained on
    # Quality beside baselines on the same validation split (None where not measured):
    probe_val_accuracy: float | None = None  # logistic regression on frozen pooled embeddings
    majority_val_accuracy: float | None = None  # always the most common training label
    val_loss: float | None = None  # expert's mean validation loss (causal LM: per token)
    base_val_loss: float | None = None  # causal LM: the base model's, without the adapter
    best_step: int | None = None  # optimizer steps of the restored checkpoint (early stopping)
    probe_seconds: float = 0.0  # share of `seconds` spent fitting the linear probe
    dp_sgd: SGDAccount | None = None  # the adapter's DP-SGD run (None: trained without DP)

    def quality(self) -> ExpertQuality:
        """The figures recorded in ``statistics.json`` (see :class:`ExpertQuality`)."""
        return ExpertQuality(
            validation_examples=self.val_count,
            validation_accuracy=self.val_accuracy,
            probe_accuracy=self.probe_val_accuracy,
            majority_accuracy=self.majority_val_accuracy,
            validation_loss=self.val_loss,
            base_validation_loss=self.base_val_loss,
        )


def train_expert(
    texts: Sequence[str],
    labels: Sequence[str] | None,
    config: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    dp_sgd: DPSGDConfig | None = None,
) -> TrainResult:
    """Train a LoRA expert and save it (PEFT format) into ``out_dir``.

    The same inputs and ``config.seed`` give bit-identical weights on the same machine.
    ``labels`` are required for classification (at least two distinct). For causal LM they
    are optional completions: with them the expert learns to continue ``texts[i]`` with
    ``labels[i]`` (loss on the completion's tokens and the EOS after it only); without them
    it learns the texts themselves. The caller's global torch RNG state is left untouched.

    With ``dp_sgd`` the adapter and head are trained with DP-SGD (:mod:`dp_sgd`): no probe
    initialisation, class weights or early stopping (each would use the data without noise).
    """
    started = time.perf_counter()
    if dp_sgd is not None:
        if config.task_type != "classification":
            raise ValueError("DP-SGD (--dp-sgd-epsilon) supports classification experts only")
        config = dataclasses.replace(
            config, probe_init=False, class_weighting="none", early_stopping=False
        )
    config.validate()
    texts, labels = select_examples(texts, labels, config.max_examples, config.seed)
    causal_lm = config.task_type == "causal_lm"
    label_names: list[str] = []
    label_ids: list[int] | None = None
    if not causal_lm:
        label_names, label_ids = _label_ids(labels)
    split_labels = None if causal_lm else labels
    train_idx, val_idx = train_validation_split(
        split_labels, len(texts), config.validation_fraction, config.seed
    )
    tokenizer = load_tokenizer(config.base_model)
    prompt_lengths = None
    if causal_lm and labels is not None:
        token_ids, prompt_lengths = encode_completions(tokenizer, texts, labels, config.max_length)
    else:
        token_ids = encode(tokenizer, texts, config.max_length)

    class_weights = None
    probe_accuracy = majority_accuracy = base_val_loss = None
    probe_seconds = 0.0
    if not causal_lm:
        class_weights = class_weight_vector(
            [label_ids[i] for i in train_idx], len(label_names), config.class_weighting
        )
        majority_accuracy = _majority_accuracy(label_ids, train_idx, val_idx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        base = load_task_model(config.base_model, config.task_type, label_names, tokenizer)
        if not causal_lm:
            begin = time.perf_counter()
            probe_accuracy = probe_head(
                base, tokenizer, token_ids, label_ids, train_idx, val_idx, config, class_weights
            )
            probe_seconds = time.perf_counter() - begin
        model = get_peft_model(base, lora_config(config))
        if causal_lm and val_idx:
            with model.disable_adapter():
                _, base_val_loss = evaluate(
                    model,
                    tokenizer,
                    token_ids,
                    None,
                    val_idx,
                    config.batch_size,
                    True,
                    config.bf16,
                    prompt_lengths,
                )
        sgd_account = None
        if dp_sgd is not None:
            from moerge.contributor_client.dp_sgd import calibrate, train_adapter_dp

            calibrate(dp_sgd, dp_sgd.runs(len(train_idx), config.epochs))
            curve, sgd_account = train_adapter_dp(
                model,
                tokenizer,
                token_ids,
                label_ids,
                train_idx,
                dp_sgd,
                config.epochs,
                config.seed,
                config.warmup_fraction,
                progress,
            )
            best_step = None
        else:
            curve, best_step = _train(
                model,
                tokenizer,
                token_ids,
                label_ids,
                train_idx,
                val_idx,
                config,
                progress,
                prompt_lengths,
                class_weights,
            )

    val_accuracy = val_loss = None
    if val_idx:
        val_accuracy, val_loss = evaluate(
            model,
            tokenizer,
            token_ids,
            label_ids,
            val_idx,
            config.batch_size,
            causal_lm,
            config.bf16,
            prompt_lengths,
        )
    save_adapter(model, out_dir, config.base_model_id or config.base_model)
    return TrainResult(
        label_names=label_names,
        train_loss_curve=curve,
        val_accuracy=val_accuracy,
        val_count=len(val_idx),
        seconds=time.perf_counter() - started,
        train_count=len(train_idx),
        probe_val_accuracy=probe_accuracy,
        majority_val_accuracy=majority_accuracy,
        val_loss=val_loss,
        base_val_loss=base_val_loss,
        best_step=best_step,
        probe_seconds=probe_seconds,
        dp_sgd=sgd_account,
    )


def class_weight_vector(
    train_label_ids: Sequence[int], num_labels: int, weighting: str
) -> torch.Tensor | None:
    """Loss weight of each label [L] from its training count ``n_c`` (None for "none").

    "balanced" is ``n / (L n_c)`` (every class weighs the same in total); "sqrt" is its
    square root, which lifts rare classes out of the majority's shadow without trading much
    plain accuracy for balanced accuracy. Labels absent from training count as one example.
    """
    if weighting == "none":
        return None
    counts = torch.bincount(torch.tensor(list(train_label_ids)), minlength=num_labels)
    counts = counts.double().clamp_min(1.0)  # [L]
    weights = counts.sum() / (num_labels * counts)
    return (weights.sqrt() if weighting == "sqrt" else weights).float()


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
    hook = model.classifier.register_forward_pre_hook(
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


def probe_head(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    config: TrainConfig,
    class_weights: torch.Tensor | None,
) -> float | None:
    """Fit the linear probe; with ``probe_init`` it becomes the head. Its validation accuracy.

    None (and the head left random) when the head is not one ``Linear`` named ``classifier``.
    """
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Linear):
        return None
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
        return None
    predicted = (features[n:] @ weight.T + bias).argmax(dim=-1)
    return float((predicted == targets[n:]).float().mean())


def _majority_accuracy(
    label_ids: Sequence[int], train_idx: Sequence[int], val_idx: Sequence[int]
) -> float | None:
    """Validation accuracy of always answering the most common training label."""
    if not val_idx:
        return None
    counts = torch.bincount(torch.tensor([label_ids[i] for i in train_idx]))
    majority = int(counts.argmax())
    return sum(label_ids[i] == majority for i in val_idx) / len(val_idx)


def load_task_model(
    base_model: str,
    task_type: str,
    label_names: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
) -> PreTrainedModel:
    """The base model with the task's head, in float32 (CPU training and exact statistics).

    A classification head is new (randomly initialised from the torch RNG) and named after
    ``label_names``; a causal LM keeps its own LM head.
    """
    if task_type == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            base_model,
            dtype=torch.float32,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
    if model.config.pad_token_id is None:
        # Decoder classifiers find each example's last token through the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def lora_config(config: TrainConfig) -> LoraConfig:
    """PEFT's LoRA config for ``config`` (``SEQ_CLS`` adds the head to ``modules_to_save``)."""
    targets = None if config.target_modules is None else list(config.target_modules)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM if config.task_type == "causal_lm" else TaskType.SEQ_CLS,
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
    )


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[Sequence[int]],
    label_ids: Sequence[int] | None,
    indices: Sequence[int],
    batch_size: int,
    causal_lm: bool,
    bf16: bool = False,
    prompt_lengths: Sequence[int] | None = None,
) -> tuple[float, float]:
    """Accuracy and mean unweighted cross-entropy on ``indices``: of the predicted label (loss
    per example), or for causal LM of every next token (of the completion's tokens only, given
    ``prompt_lengths``; loss per token)."""
    model.eval()
    correct = 0
    total = 0
    loss_sum = 0.0
    for rows in sorted_batches([len(token_ids[i]) for i in indices], batch_size):
        chosen = [indices[r] for r in rows]
        batch = collate(
            [token_ids[i] for i in chosen],
            tokenizer,
            None if label_ids is None else [label_ids[i] for i in chosen],
            causal_lm=causal_lm,
            prompt_lengths=None if prompt_lengths is None else [prompt_lengths[i] for i in chosen],
        )
        labels = batch.pop("labels")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(**batch).logits.float()
        if causal_lm:
            logits = logits[:, :-1]  # [B, T-1, V]: token t+1 predicted at t
            target = labels[:, 1:]  # [B, T-1]
            counted = target != IGNORE_INDEX
            correct += int(((logits.argmax(dim=-1) == target) & counted).sum())
            total += int(counted.sum())
            loss_sum += float(
                F.cross_entropy(logits.transpose(1, 2), target, reduction="sum")
            )  # ignore_index defaults to IGNORE_INDEX
        else:
            correct += int((logits.argmax(dim=-1) == labels).sum())  # logits [B, L]
            total += len(chosen)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
    return correct / max(total, 1), loss_sum / max(total, 1)


def save_adapter(model: PeftModel, out_dir: str | Path, base_model_id: str) -> None:
    """Write exactly ``adapter_config.json`` and ``adapter_model.safetensors`` to ``out_dir``.

    ``save_pretrained`` also writes a README model card; saving through a temporary folder
    keeps only PEFT's two files and never touches anything else in ``out_dir``. Embedding
    matrices are never saved (the vocabulary is never resized), which also stops PEFT from
    looking ``base_model_id`` up on the Hub.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = base_model_id
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".save-") as tmp:
        model.save_pretrained(tmp, save_embedding_layers=False)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            os.replace(Path(tmp) / name, out_dir / name)


def _train(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: Sequence[Sequence[int]],
    label_ids: Sequence[int] | None,
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    config: TrainConfig,
    progress: bool,
    prompt_lengths: Sequence[int] | None = None,
    class_weights: torch.Tensor | None = None,
) -> tuple[list[float], int | None]:
    """AdamW over the trainable (LoRA + head) parameters.

    Returns the loss of every step and, with early stopping, the step of the restored
    checkpoint (0: the starting point, e.g. the linear probe, was never beaten).
    """
    generator = torch.Generator().manual_seed(config.seed)
    lengths = [len(token_ids[i]) for i in train_idx]
    per_epoch = math.ceil(len(train_idx) / config.batch_size)
    causal_lm = config.task_type == "causal_lm"
    # Causal LM steps are many times dearer (a 135M+ decoder): min_steps is for classifiers.
    total_steps = max(per_epoch * config.epochs, 0 if causal_lm else config.min_steps)
    epochs = math.ceil(total_steps / per_epoch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, config),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    warmup = max(1, round(config.warmup_fraction * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, warmup, total_steps, config.lr_schedule)
    )
    stopper = (
        _EarlyStopping(model, tokenizer, token_ids, label_ids, val_idx, config, prompt_lengths)
        if config.early_stopping and val_idx
        else None
    )
    eval_every = config.eval_every or per_epoch
    curve: list[float] = []
    step = 0
    if stopper is not None:
        stopper.check(0)
    model.train()
    with training_progress(progress) as bar:
        task = bar.add_task("training", total=total_steps, loss=float("nan"))
        for epoch in range(epochs):
            for rows in length_grouped_batches(lengths, config.batch_size, generator):
                chosen = [train_idx[r] for r in rows]
                batch = collate(
                    [token_ids[i] for i in chosen],
                    tokenizer,
                    None if label_ids is None else [label_ids[i] for i in chosen],
                    causal_lm=causal_lm,
                    prompt_lengths=(
                        None if prompt_lengths is None else [prompt_lengths[i] for i in chosen]
                    ),
                )
                labels = None if causal_lm else batch.pop("labels")
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                    output = model(**batch)
                    loss = (
                        output.loss
                        if causal_lm
                        else F.cross_entropy(output.logits.float(), labels, weight=class_weights)
                    )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, max_norm=1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                curve.append(loss.item())
                step += 1
                window = curve[-config.progress_window :]
                bar.update(
                    task,
                    advance=1,
                    description=f"epoch {epoch + 1}/{epochs}",
                    loss=sum(window) / len(window),
                )
                if stopper is not None and (step % eval_every == 0 or step == total_steps):
                    stopper.check(step)
                    model.train()
                if step >= total_steps or (stopper is not None and stopper.exhausted):
                    break
            if step >= total_steps or (stopper is not None and stopper.exhausted):
                break
    if stopper is None:
        return curve, None
    return curve, stopper.restore()


def _parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict[str, object]]:
    """The trainable parameters, the LoRA factors at ``learning_rate`` and the head (PEFT's
    ``modules_to_save`` copy) at ``head_learning_rate``."""
    head_lr = config.head_learning_rate
    lora, head = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (head if "modules_to_save" in name else lora).append(parameter)
    if head_lr is None or not head:
        return [{"params": lora + head}]
    return [{"params": lora}, {"params": head, "lr": head_lr}]


def _lr_factor(step: int, warmup: int, total: int, shape: str) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then linear or cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return (total - step) / max(1, total - warmup)


class _EarlyStopping:
    """Keeps the trainable weights of the best validation evaluation so far.

    Best means highest accuracy, ties broken by lower loss: on small validation splits
    accuracy moves in coarse steps, and the loss tells apart checkpoints it cannot.
    """

    def __init__(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        token_ids: Sequence[Sequence[int]],
        label_ids: Sequence[int] | None,
        val_idx: Sequence[int],
        config: TrainConfig,
        prompt_lengths: Sequence[int] | None,
    ) -> None:
        self.model, self.config = model, config
        self.evaluate_args = (tokenizer, token_ids, label_ids, val_idx, config.batch_size)
        self.prompt_lengths = prompt_lengths
        self.best: tuple[float, float] | None = None
        self.best_step = 0
        self.best_state: dict[str, torch.Tensor] = {}
        self.stale = 0

    @property
    def exhausted(self) -> bool:
        return self.stale >= self.config.patience

    def check(self, step: int) -> None:
        accuracy, loss = evaluate(
            self.model,
            *self.evaluate_args,
            self.config.task_type == "causal_lm",
            self.config.bf16,
            self.prompt_lengths,
        )
        key = (accuracy, -loss)
        if self.best is not None and key <= self.best:
            self.stale += 1
            return
        self.best, self.best_step, self.stale = key, step, 0
        self.best_state = {
            name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad
        }

    def restore(self) -> int:
        """Put the best weights back; the step they were taken at."""
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_state.items():
                parameters[name].copy_(value)
        return self.best_step


def training_progress(enabled: bool) -> Progress:
    """A rich progress bar (on stderr) showing epoch, step, running loss and time left."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps  loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def select_examples(
    texts: Sequence[str], labels: Sequence[str] | None, limit: int | None, seed: int
) -> tuple[list[str], list[str] | None]:
    """The examples training uses: all, or a seeded random subset of ``limit`` (file order)."""
    texts = list(texts)
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if limit is None or limit >= len(texts):
        return texts, None if labels is None else list(labels)
    keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
    return [texts[i] for i in keep], None if labels is None else [labels[i] for i in keep]


def _label_ids(labels: Sequence[str] | None) -> tuple[list[str], list[int]]:
    if labels is None:
        raise ValueError("classification needs a label for every example (none were given)")
    names = label_order(labels)
    if len(names) < 2:
        raise ValueError(f"classification needs at least two distinct labels, got {names}")
    index = {name: i for i, name in enumerate(names)}
    return names, [index[label] for label in labels]
