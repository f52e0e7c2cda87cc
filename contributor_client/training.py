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

How: :mod:`.recipe` (the settings and the default LP-FT recipe), :mod:`.linear_probe` (the
probe the head starts from, and the baselines the expert is measured against),
:mod:`.training_loop` (the optimisation and early stopping).
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from moerge.contributor_client.batching import (
    encode,
    encode_completions,
    load_tokenizer,
)
from moerge.contributor_client.data import label_order, train_validation_split
from moerge.contributor_client.linear_probe import (
    ProbeFit,
    majority_class_accuracy,
    probe_head,
    set_head,
)
from moerge.contributor_client.recipe import TrainConfig
from moerge.contributor_client.training_loop import class_weight_vector, evaluate, tune_adapter
from moerge.expert_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ExpertQuality

if TYPE_CHECKING:
    from moerge.contributor_client.dp_sgd import DPSGDConfig
    from moerge.contributor_client.privacy import SGDAccount


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
    class_ids: list[int] = []  # classification: each example's index in label_names
    if not causal_lm:
        label_names, class_ids = _label_ids(labels)
    label_ids = None if causal_lm else class_ids  # None: a causal LM's completions
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
    probe = ProbeFit(None)
    if not causal_lm:
        class_weights = class_weight_vector(
            [class_ids[i] for i in train_idx], len(label_names), config.class_weighting
        )
        majority_accuracy = majority_class_accuracy(class_ids, train_idx, val_idx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        base = load_task_model(config.base_model, config.task_type, label_names, tokenizer)
        if not causal_lm:
            begin = time.perf_counter()
            probe = probe_head(
                base, tokenizer, token_ids, class_ids, train_idx, val_idx, config, class_weights
            )
            probe_accuracy = probe.accuracy
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
            from moerge.contributor_client.dp_sgd import (
                calibrate,
                train_adapter_dp,
                train_head_dp,
            )

            calibrate(dp_sgd, dp_sgd.runs(len(train_idx), config.epochs))
            # the head alone over features computed once, unless LoRA is trained too
            train_dp = train_adapter_dp if dp_sgd.train_lora else train_head_dp
            curve, sgd_account = train_dp(
                model,
                tokenizer,
                token_ids,
                class_ids,
                train_idx,
                dp_sgd,
                config.epochs,
                config.seed,
                config.warmup_fraction,
                progress,
            )
            best_step = None
        else:
            curve, best_step = tune_adapter(
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
    if best_step == 0 and probe.refit is not None:
        # The probe itself was kept: refit on all examples now that validation has chosen.
        set_head(model, *probe.refit)
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
        # PEFT annotates lora_alpha as int but only divides it by r (or sqrt r): a float is fine.
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=config.lora_dropout,
        target_modules=targets,
    )


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
